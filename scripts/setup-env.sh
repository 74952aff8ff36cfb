# Sourced by train.sh and test.sh: make the virtual environment .venv once, install s11lib into
# it (editable, with the extras named in $S11_EXTRAS, e.g. "test"), and activate it. Re-running is quick:
# pip only checks what is already there.
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $(${PYTHON:-python3} --version)" >&2
  "${PYTHON:-python3}" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
echo "installing s11lib${S11_EXTRAS:+[$S11_EXTRAS]} and its dependencies into .venv (the first time takes a few minutes: torch)" >&2
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${S11_EXTRAS:+[$S11_EXTRAS]}"
# shellcheck disable=SC1091
source .venv/bin/activate
