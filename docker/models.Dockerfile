# syntax=docker/dockerfile:1.7
# The model set as an image: /models/fieldlens (manifest, taxonomy, tiny ensemble) and
# /models/triton (the Triton model repository). Pods copy it into a volume with an init
# container (deploy/k8s/base/config/sync-models.sh), so a model set ships and rolls back
# apart from the code. Tag it with the model-set version from deploy/models/manifest.json:
#   docker build -f docker/models.Dockerfile \
#     -t "fieldlens-models:$(python -c 'import json; print(json.load(open("deploy/models/manifest.json"))["model_set_version"])')" .
ARG BUSYBOX_IMAGE=busybox:1.37.0

FROM ${BUSYBOX_IMAGE} AS collect
COPY deploy/models/ /models/fieldlens/
COPY deploy/triton/model_repository/ /models/triton/
# Readable by whichever user the pods run as.
RUN chmod -R a+rX,go-w /models

FROM ${BUSYBOX_IMAGE}
COPY --from=collect /models /models
USER 65532:65532
