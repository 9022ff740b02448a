#!/usr/bin/env bash
# Prints a Python >= 3.12 interpreter that actually runs, or fails with a clear message.
# Tries python3.12/python3.13/python3 on PATH, then pyenv-installed 3.12+ versions.
ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; }
for c in python3.12 python3.13 python3; do
  if command -v "$c" >/dev/null 2>&1 && ok "$c"; then command -v "$c"; exit 0; fi
done
if command -v pyenv >/dev/null 2>&1; then
  root=$(pyenv root)
  for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.(1[2-9]|[2-9][0-9])' | sort -V); do
    c="$root/versions/$v/bin/python3"
    if ok "$c"; then echo "$c"; exit 0; fi
  done
fi
echo "error: no Python >= 3.12 found (tried python3.12, python3.13, python3, pyenv versions);" \
     "install Python 3.12 and put it on PATH" >&2
exit 1
