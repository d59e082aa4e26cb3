#!/bin/sh
# Copies the model set out of the models image into the pod's shared volume (init container).
#
# MODEL_SET_VERSION: the version the deployment expects; a models image that holds another
#   one (a re-pushed tag, a stale node cache) stops the pod here instead of serving it.
# MODEL_SET_PARTS: what this pod needs: "fieldlens" (manifest, taxonomy, tiny ensemble)
#   and/or "triton" (the model repository).
# TRITON_INSTANCE_KIND: when set, every config.pbtxt's instance_group kind becomes it
#   (KIND_GPU on the GPU pool); the repository is exported with KIND_CPU.
set -eu
src="${MODEL_SET_SOURCE:-/models}"
dst="${MODEL_SET_TARGET:-/mnt/models}"
want="${MODEL_SET_VERSION:?MODEL_SET_VERSION is not set}"

if ! grep -q "\"model_set_version\": *\"$want\"" "$src/fieldlens/manifest.json"; then
  echo "models image holds another model set than $want:" >&2
  grep '"model_set_version"' "$src/fieldlens/manifest.json" >&2 || true
  exit 1
fi
for part in ${MODEL_SET_PARTS:-fieldlens triton}; do
  rm -rf "${dst:?}/$part"
  cp -R "$src/$part" "$dst/$part"
done
if [ -n "${TRITON_INSTANCE_KIND:-}" ] && [ -d "$dst/triton" ]; then
  for config in "$dst"/triton/*/config.pbtxt; do
    sed -i "s/kind: KIND_[A-Z]*/kind: $TRITON_INSTANCE_KIND/" "$config"
  done
fi
echo "model set $want: copied ${MODEL_SET_PARTS:-fieldlens triton} to $dst"
