#!/usr/bin/env bash
# Screenshot the TensorBoard chart of one scalar of a finished run (docs/images/tensorboard_scalars.png).
# Starts TensorBoard on <run dir>/tensorboard on a free localhost port, lets
# experiments/tensorboard_screenshot.py (Playwright + system Chromium) filter the Time Series
# dashboard to the tag and save a PNG, and stops TensorBoard on exit, also on failure.
# Usage: bash experiments/tensorboard_screenshot.sh <run dir> [out.png] [tag regex] [helper options]
#   defaults: out=docs/images/tensorboard_scalars.png, tag=^val/brain_to_image_top1$; further
#   arguments go to the helper (e.g. --smoothing 0.6 --timeout 30; see its --help)
# Env: PYTHON (a Python with playwright; default python3), TENSORBOARD (default tensorboard),
#      CHROMIUM (default /usr/bin/chromium). Needs `apt-get install chromium` and
#      `pip install playwright` (a separate venv is fine); no `playwright install`.
set -euo pipefail
run=${1:?run directory (<BDF_ROOT>/logs/train/runs/<stamp>_<id>)}
out=${2:-docs/images/tensorboard_scalars.png}
tag=${3:-^val/brain_to_image_top1\$}
shift $(( $# < 3 ? $# : 3 ))
py=${PYTHON:-python3}
tb=${TENSORBOARD:-tensorboard}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
logdir="$run/tensorboard"
[[ -d "$logdir" ]] || { echo "no TensorBoard logs at $logdir" >&2; exit 2; }
command -v "$tb" >/dev/null || { echo "tensorboard not found (set TENSORBOARD=/path/to/tensorboard)" >&2; exit 2; }

port=$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
tb_log=$(mktemp -t tensorboard-shot.XXXXXX.log)
# the run is named after its folder (<stamp>_<id>) in TensorBoard's run list
"$tb" --logdir_spec "$(basename "$run"):$logdir" --host 127.0.0.1 --port "$port" >"$tb_log" 2>&1 &
tb_pid=$!
cleanup() {
  kill "$tb_pid" 2>/dev/null || true
  wait "$tb_pid" 2>/dev/null || true
  rm -f "$tb_log"
}
trap cleanup EXIT

for _ in $(seq 120); do  # up to 60 s for TensorBoard to answer
  kill -0 "$tb_pid" 2>/dev/null || { echo "tensorboard exited early:" >&2; cat "$tb_log" >&2; exit 1; }
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.5
done

"$py" "$here/tensorboard_screenshot.py" --url "http://127.0.0.1:$port" --out "$out" --tag "$tag" \
  --chromium "${CHROMIUM:-/usr/bin/chromium}" "$@"
