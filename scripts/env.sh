# Sourced by the scripts: the environment that builds and runs phalanx against the venv's libtorch.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export LIBTORCH_USE_PYTORCH=1
export PATH="$ROOT/.venv/bin:$PATH"
