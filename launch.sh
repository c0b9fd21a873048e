#!/usr/bin/env bash
# The published experiments by name, and the embedded demo.
#
#   bash launch.sh demo                                   # CPU demo on the embedded digits (4 to 7 minutes on 2 cores)
#   bash launch.sh compare                                # CT, iCT, sCT, ECT, CD, sCD, MeanFlow on the digits (docs/digits.md: time)
#   bash launch.sh phema_sweep                            # post-hoc EMA sweep on the digits (docs/digits.md: time)
#   bash launch.sh list                                   # every preset, with what it runs
#   bash launch.sh ct_imagenet64 --data_dir /data/imagenet64          # one process
#   NPROC=8 bash launch.sh ct_imagenet64 --data_dir /data/imagenet64  # mpiexec -n 8
#   bash launch.sh -n 8 sample_ct_imagenet64_onestep --model_path ct_imagenet64.pt
#
# A preset (configs/NAME.json) names its script and flags; flags after NAME override it.
set -euo pipefail
cd "$(dirname "$0")"

nproc="${NPROC:-1}"
if [ "${1:-}" = "-n" ]; then
  nproc="${2:?-n needs a process count}"
  shift 2
fi
name="${1:-list}"
shift || true

case "$name" in
  demo)
    exec python scripts/demo.py "$@"
    ;;
  compare)
    exec python scripts/compare_digits.py "$@"
    ;;
  phema_sweep)
    exec python scripts/phema_sweep_digits.py "$@"
    ;;
  list|-h|--help)
    sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
    echo
    python - <<'PY'
import signal
from cm.config import load_preset, preset_names
signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # (`bash launch.sh list | head`: stop quietly when the reader does)
for name in preset_names():
    preset = load_preset(name)
    print(f"{name:40s} {preset['script']:18s} {preset.get('description', '')}")
PY
    exit 0
    ;;
esac

# the preset's name and script are checked (one of configs/*.json, one of scripts/*.py) before anything runs
script=$(python - "$name" <<'PY'
import sys
from cm.cli import run_cli
from cm.config import preset_script
run_cli(lambda: print(preset_script(sys.argv[1])))
PY
)
if [ "$nproc" -gt 1 ]; then
  exec mpiexec -n "$nproc" python "scripts/$script" --config "$name" "$@"
fi
exec python "scripts/$script" --config "$name" "$@"
