"""The suite's clean-up of DeepSpeed's /dev/shm buffers spares files a live process holds."""

from shared_memory import held_open


def test_a_file_is_held_while_a_process_has_it_open_and_not_after(tmp_path):
    buffer = tmp_path / "deepspeed_allreduce_buffer_0_127.0.0.1_1234_0"
    buffer.write_bytes(b"\0" * 16)
    other = tmp_path / "other"
    other.write_bytes(b"")
    with open(buffer, "rb"):
        assert held_open(str(tmp_path)) == {buffer.name}
    assert held_open(str(tmp_path)) == set()
