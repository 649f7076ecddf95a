#!/bin/bash
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD/server:$PWD/operator PYTHONUNBUFFERED=1
date
python3 -m pytest -m gpu tests/server -q -p no:cacheprovider -rA 2>&1 | grep -v "DEBUG\|Warning\|warn" | tail -25
date
