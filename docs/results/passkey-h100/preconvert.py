# Works around models/loading.py creating its temporary folder twice (atomic.directory + _convert_gguf's mkdir).
import sys
from pathlib import Path
import kvforge.models.loading as L
original = L._convert_gguf
def convert(gguf_path, out_dir):
    if out_dir.exists() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    return original(gguf_path, out_dir)
L._convert_gguf = convert
print(L.resolve_model(sys.argv[1]))
