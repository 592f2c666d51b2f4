#!/usr/bin/env bash
# Renders every kustomize overlay under deploy/overlays and validates each rendered object
# against the Kubernetes OpenAPI schemas, strictly (an unknown or misspelt field is an error).
# Offline: kustomize runs locally and kubernetes-validate ships its schemas.
#
#   scripts/check-manifests.sh [OVERLAY_DIR...]      (default: every deploy/overlays/*/)
#
# Needs `kubectl` (its built-in kustomize; a standalone `kustomize` also works) and
# `kubernetes-validate` (requirements.txt; `make venv` installs it into .venv), looked for as
# .venv/bin/kubernetes-validate, then on PATH ($KUBERNETES_VALIDATE overrides both).
# Settings: K8S_VERSION, the Kubernetes version to validate against (default 1.32; the
# validator uses its newest schema not newer than that).
#
# Prints one line per overlay; exits 1 if any overlay fails to render or to validate, 2 if a
# tool is missing.

set -euo pipefail
cd "$(dirname "$0")/.."

# Every workspace member must be copied into both images: cargo reads every member's manifest
# even to build one package (there is no Docker engine here to find out by building).
members=$(sed -n 's/^members = \[\(.*\)\]/\1/p' Cargo.toml | tr -d '" ' | tr ',' ' ')
for dockerfile in deploy/docker/*.Dockerfile; do
    for m in $members; do
        if ! grep -qE "^COPY $m $m\$" "$dockerfile"; then
            echo "FAIL $dockerfile: the workspace member $m is not copied (COPY $m $m)" >&2
            exit 1
        fi
    done
done
echo "ok   deploy/docker: every workspace member ($members) is copied into each image"

K8S_VERSION=${K8S_VERSION:-1.32}

if [[ -n ${KUBERNETES_VALIDATE:-} ]]; then
    kv=$KUBERNETES_VALIDATE
elif [[ -x .venv/bin/kubernetes-validate ]]; then
    kv=.venv/bin/kubernetes-validate
elif command -v kubernetes-validate >/dev/null 2>&1; then
    kv=$(command -v kubernetes-validate)
else
    echo "check-manifests: kubernetes-validate not found (.venv/bin or PATH); pip install kubernetes-validate==1.37.0" >&2
    exit 2
fi

if command -v kubectl >/dev/null 2>&1; then
    render() { kubectl kustomize "$1"; }
elif command -v kustomize >/dev/null 2>&1; then
    render() { kustomize build "$1"; }
else
    echo "check-manifests: neither kubectl nor kustomize found on PATH" >&2
    exit 2
fi

if (($# > 0)); then
    overlays=("$@")
else
    overlays=()
    for dir in deploy/overlays/*; do
        if [[ -f $dir/kustomization.yaml || -f $dir/kustomization.yml || -f $dir/Kustomization ]]; then
            overlays+=("$dir")
        fi
    done
fi
if ((${#overlays[@]} == 0)); then
    echo "check-manifests: no overlays found under deploy/overlays" >&2
    exit 1
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

failed=0
for dir in "${overlays[@]}"; do
    name=$(basename "$dir")
    rendered=$tmp/$name.yaml
    if ! render "$dir" >"$rendered" 2>"$tmp/$name.err"; then
        echo "FAIL $name: kustomize could not render $dir:"
        sed 's/^/    /' "$tmp/$name.err"
        failed=1
        continue
    fi
    # Top-level `kind:` lines: one per rendered object (everything nested is indented).
    objects=$(grep -c '^kind:' "$rendered" || true)
    if ((objects == 0)); then
        echo "FAIL $name: $dir renders no objects"
        failed=1
        continue
    fi
    rc=0
    out=$("$kv" --kubernetes-version "$K8S_VERSION" --strict "$rendered" 2>&1) || rc=$?
    passed=$(grep -c '^INFO .* passed for resource ' <<<"$out" || true)
    # Anything but a pass is a failure, including the validator's WARN for a kind it has no
    # schema for (it would otherwise let such an object through unchecked).
    problems=$(grep -v '^INFO .* passed for resource ' <<<"$out" || true)
    if ((rc != 0)) || [[ -n $problems ]] || ((passed != objects)); then
        echo "FAIL $name: $passed of $objects objects valid against Kubernetes $K8S_VERSION (strict):"
        sed -e "s#$rendered#$dir#g" -e 's/^/    /' <<<"${problems:-(no message; validator exit status $rc)}"
        failed=1
        continue
    fi
    against=$(sed -n 's/^INFO .* against version \([0-9.]*\)$/\1/p' <<<"$out" | sort -u | paste -sd, -)
    echo "ok   $name: $objects objects rendered and valid against Kubernetes ${against:-$K8S_VERSION} (strict)"
done

exit "$failed"
