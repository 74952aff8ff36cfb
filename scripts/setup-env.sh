# Sourced by train.sh and test.sh: make the virtual environment .venv once, install s11lib into
# it (editable, with the extras named in $S11_EXTRAS, e.g. "test"), and activate it.
#
# pip runs only when needed: the first time, after pyproject.toml changed, or when s11lib cannot
# be imported (the checkout moved, say). A stamp in .venv records what was installed; delete
# .venv/.s11lib-installed* to force a re-install.
#
# PyTorch from PyPI is a CUDA build: about 5.5 GB once installed, on any machine; it runs on the CPU
# too. S11_TORCH_INDEX=https://download.pytorch.org/whl/cpu takes the CPU build from PyTorch's own
# index the first time instead (a .venv of about 1.3 GB); any other index works the same way (e.g.
# .../whl/cu126). The index is tried first (15 s): one that cannot be reached stops the set-up in
# one line before anything is installed. pip would otherwise retry for minutes and then pair wheels
# it finds elsewhere that do not belong together (a torchvision built for another torch).
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $(${PYTHON:-python3} --version)" >&2
  "${PYTHON:-python3}" -m venv .venv
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
fi
s11_want="$(.venv/bin/python -c 'import hashlib, os; print(hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest(), os.getcwd())')"
s11_stamp=".venv/.s11lib-installed${S11_EXTRAS:+-$S11_EXTRAS}"
if [ "$(cat "$s11_stamp" 2>/dev/null)" != "$s11_want" ] || ! .venv/bin/python -c "import s11lib" 2>/dev/null; then
  if [ -n "${S11_TORCH_INDEX:-}" ] && \
      ! .venv/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is None)"; then
    if ! .venv/bin/python -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1].rstrip('/') + '/torch/', timeout=15)" \
        "$S11_TORCH_INDEX" 2>/dev/null; then
      echo "error: S11_TORCH_INDEX=$S11_TORCH_INDEX cannot be reached from here; run without it to take PyPI's torch (a CUDA build, which runs on the CPU too)" >&2
      return 1 2>/dev/null || exit 1
    fi
    echo "installing PyTorch from $S11_TORCH_INDEX" >&2
    .venv/bin/python -m pip install -q --disable-pip-version-check --retries 2 --timeout 30 \
      --index-url "$S11_TORCH_INDEX" torch torchvision
  fi
  echo "installing s11lib${S11_EXTRAS:+[$S11_EXTRAS]} and its dependencies into .venv (the first time takes a few minutes: torch)" >&2
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".${S11_EXTRAS:+[$S11_EXTRAS]}"
  if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
    echo "error: torch and torchvision in .venv do not import together (builds for different versions); delete .venv and run again${S11_TORCH_INDEX:+ without S11_TORCH_INDEX (torch and torchvision from PyPI match)}" >&2
    return 1 2>/dev/null || exit 1
  fi
  echo "$s11_want" > "$s11_stamp"
  echo "$s11_want" > .venv/.s11lib-installed  # any extras include the base install
fi
unset s11_want s11_stamp
# shellcheck disable=SC1091
source .venv/bin/activate
