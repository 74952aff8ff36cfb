# Sourced by train.sh and test.sh: make the virtual environment .venv once, install s11lib into
# it (editable, with the extras named in $S11_EXTRAS, e.g. "test"), and activate it.
#
# pip runs only when needed: the first time, after pyproject.toml changed, or when s11lib cannot
# be imported (the checkout moved, say). A stamp in .venv records what was installed; delete
# .venv/.s11lib-installed* to force a re-install.
#
# PyTorch from PyPI is a CUDA build: about 5.5 GB once installed, on any machine. On Linux with no
# NVIDIA driver (no nvidia-smi), the first install takes the CPU build from PyTorch's own index
# instead (about 1 GB), and falls back to PyPI if that index cannot be reached.
# S11_TORCH_INDEX=URL picks another index (e.g. https://download.pytorch.org/whl/cu126);
# S11_TORCH_INDEX= (empty) always takes PyPI's.
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $(${PYTHON:-python3} --version)" >&2
  "${PYTHON:-python3}" -m venv .venv
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
fi
s11_want="$(.venv/bin/python -c 'import hashlib, os; print(hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest(), os.getcwd())')"
s11_stamp=".venv/.s11lib-installed${S11_EXTRAS:+-$S11_EXTRAS}"
if [ "$(cat "$s11_stamp" 2>/dev/null)" != "$s11_want" ] || ! .venv/bin/python -c "import s11lib" 2>/dev/null; then
  if ! .venv/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is None)"; then
    s11_index="${S11_TORCH_INDEX-auto}"
    if [ "$s11_index" = auto ]; then
      s11_index=
      if [ "$(uname -s)" = Linux ] && ! command -v nvidia-smi >/dev/null; then
        s11_index=https://download.pytorch.org/whl/cpu
      fi
    fi
    if [ -n "$s11_index" ]; then
      echo "installing PyTorch from $s11_index (no NVIDIA driver here: the CPU build, about 1 GB)" >&2
      .venv/bin/python -m pip install -q --disable-pip-version-check --timeout 30 --retries 1 \
        --index-url "$s11_index" torch torchvision ||
        echo "could not install PyTorch from $s11_index; taking PyPI's (a CUDA build, about 5.5 GB)" >&2
    fi
  fi
  echo "installing s11lib${S11_EXTRAS:+[$S11_EXTRAS]} and its dependencies into .venv (the first time takes a few minutes: torch)" >&2
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".${S11_EXTRAS:+[$S11_EXTRAS]}"
  echo "$s11_want" > "$s11_stamp"
  echo "$s11_want" > .venv/.s11lib-installed  # any extras include the base install
fi
unset s11_want s11_stamp s11_index
# shellcheck disable=SC1091
source .venv/bin/activate
