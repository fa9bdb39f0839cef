#!/usr/bin/env bash
# Set up everything meansparse_pl needs, idempotently: a virtual environment with the package and its
# dependencies (torch and torchvision in the SAME pip command, so pip cannot swap torch for another build),
# and the real Fashion-MNIST files for the demo.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.meansparse_pl-installed"
want="$(cat pyproject.toml scripts/setup.sh; echo "$TORCH_SPEC")"  # a changed install recipe reinstalls
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing meansparse_pl and its dependencies (one pip command)"
  # shellcheck disable=SC2086
  "$VENV/bin/pip" install --quiet --disable-pip-version-check $TORCH_SPEC -e ".[dev]"
  # torchattacks is the independent second attack library the tests compare against; --no-deps so it
  # cannot pull another torch (its package __init__ needs scipy, which the tests avoid importing).
  "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps "torchattacks==3.5.1"
  # robustbench / timm architectures (the [robustbench] extra), also --no-deps: robustbench pins old packages
  # and imports `autoattack`; meansparse_pl.robustbench imports it in a contained, shimmed way. AFTER
  # torchattacks and with --force-reinstall: the torchattacks 3.5.1 wheel ships an old copy of the
  # `robustbench` package whose files would otherwise replace robustbench 1.1.1's model zoo.
  "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps --force-reinstall \
    "robustbench==1.1.1" "timm==1.0.9"
  printf '%s' "$want" >"$stamp"
else
  echo "[setup] $VENV is up to date"
fi

FMNIST=/usr/share/datasets/fashion-mnist
if [ -f "$FMNIST/train-images-idx3-ubyte.gz" ]; then
  echo "[setup] Fashion-MNIST found in $FMNIST"
elif command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ] \
    && (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
        || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1)); then
  echo "[setup] installed Debian's dataset-fashion-mnist into $FMNIST"
elif "$VENV/bin/python" -c "import torchvision; torchvision.datasets.FashionMNIST('data/fashion-mnist', download=True)" >/dev/null 2>&1; then
  echo "[setup] downloaded Fashion-MNIST with torchvision into data/fashion-mnist (set data.init_args.data_dir to data/fashion-mnist/FashionMNIST/raw)"
else
  echo "[setup] Fashion-MNIST is not available: run 'apt-get install dataset-fashion-mnist' (Debian/Ubuntu) or give the demo a directory with the four *-ubyte.gz files." >&2
fi
