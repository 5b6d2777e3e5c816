#!/bin/bash
# An environment with GPTQModel 7.7.0 + optimum 2.3.0 beside anybit, for the GPTQ-layout peer
# checks (tests/peers/test_gptqmodel.py, benchmarks/gptq_check.py). GPTQModel's release asks
# for torch>=2.14.1, which would pull a multi-GB CUDA build; its other requirements are
# installed under a constraint torch==2.13.0 (the CPU wheel on this disk), then gptqmodel
# itself without its dependency list, then anybit without its own (all already there).
#   bash benchmarks/gptqmodel_env.sh /tmp/gqm      # ~2 minutes from the local package mirror
#   /tmp/gqm/bin/python -m pytest -q tests/peers/test_gptqmodel.py
set -euo pipefail
ENV=${1:?usage: gptqmodel_env.sh ENV_DIR}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
python3 -m venv "$ENV"
"$ENV/bin/pip" install -q torch==2.13.0
(cd "$WORK" && "$ENV/bin/pip" download -q --no-deps --no-binary :all: gptqmodel==7.7.0 && tar xzf gptqmodel-7.7.0.tar.gz)
grep -v '^torch>=' "$WORK/gptqmodel-7.7.0/requirements.txt" > "$WORK/req.txt"
printf 'torch==2.13.0\ntransformers==5.24.0\n' > "$WORK/constraints.txt"
"$ENV/bin/pip" install -q -r "$WORK/req.txt" -c "$WORK/constraints.txt"
"$ENV/bin/pip" install -q --no-deps --no-build-isolation "$WORK/gptqmodel-7.7.0"
"$ENV/bin/pip" install -q optimum==2.3.0 gguf tqdm pytest -c "$WORK/constraints.txt"
"$ENV/bin/pip" install -q --no-deps -e "$ROOT"
"$ENV/bin/python" -c "import gptqmodel, optimum, anybit; print('gptqmodel', gptqmodel.__version__)"
