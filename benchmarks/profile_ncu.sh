# Nsight Compute on the 8-bit latent kernel (benchmarks/ncu_latent.py), or with KERNEL=partial the 8-bit
# partial-RoPE one (benchmarks/ncu_partial.py), one launch per setting; each report written as text too: its details
# page (throughput, occupancy, warp stalls) and its SASS with per-instruction samples.
#   [KERNEL=partial] bash benchmarks/profile_ncu.sh OUTDIR BATCH CONTEXT NAME[:KEY=N,KEY=N] ...
# e.g. bash benchmarks/profile_ncu.sh $OUT 32 16384 default occupancy:half_rope_table=1,max_registers=168
set -u
case ${KERNEL:-latent} in
  latent) script=benchmarks/ncu_latent.py regex=_latent_decode ;;
  partial) script=benchmarks/ncu_partial.py regex=_partial_rope ;;
  *) echo "KERNEL=${KERNEL}: expected latent or partial" >&2; exit 2 ;;
esac
out=$1 batch=$2 context=$3
shift 3
mkdir -p "$out"
for variant in "$@"; do
  name=${variant%%:*} settings=
  [ "$name" != "$variant" ] && settings=${variant#*:}
  WRAP="ncu --clock-control none --kernel-name regex:$regex --launch-skip 2 --launch-count 1 --set full \
--import-source yes -f -o $out/$name" bash benchmarks/device_run.sh $script "$batch" "$context" \
    ${settings//,/ } > "$out/$name.log" 2>&1 || { echo "$name: ncu failed"; tail -20 "$out/$name.log"; continue; }
  ncu -i "$out/$name.ncu-rep" --page details > "$out/$name-details.txt" 2>&1
  ncu -i "$out/$name.ncu-rep" --page source --csv --print-source sass > "$out/$name-sass.csv" 2>&1
  echo "$name: $(grep -c . "$out/$name-sass.csv") SASS lines"
  grep -E "Duration|Memory Throughput|Achieved Occupancy|Theoretical Occupancy|Registers Per|Block Limit|Warp Cycles Per Issued|Issue Slots Busy|Compute \(SM\) Throughput" "$out/$name-details.txt"
done
