#!/bin/sh
# tessera-seed-models SRC DST: put the image's default models on the model volume, once.
#
# Copies every model directory of SRC (the repository built into the image, /app/model_repository)
# that DST (the shared model volume) does not have yet. A model already on the volume is never
# touched, so versions a modeller added there (model/2/, model/3/, ...) and edited configs stay.
# Each model is copied under a hidden temporary name, then renamed into place: the services and
# Triton ignore hidden directories, and when several pods seed at once one rename wins and the
# others drop their copy, so no reader ever sees a half-copied model.
set -eu
src=${1:?usage: tessera-seed-models SRC DST}
dst=${2:?usage: tessera-seed-models SRC DST}
mkdir -p "$dst"
tag="${HOSTNAME:-local}-$$"
for model in "$src"/*/; do
  [ -d "$model" ] || continue
  name=$(basename "$model")
  if [ -e "$dst/$name" ]; then
    echo "seed: $name is on the volume already (kept)"
    continue
  fi
  tmp="$dst/.seed-$name-$tag"
  rm -rf "$tmp"
  cp -R "$src/$name" "$tmp"
  if mv -T "$tmp" "$dst/$name" 2>/dev/null; then
    echo "seed: $name copied"
  else
    rm -rf "$tmp"
    echo "seed: $name was copied by another pod"
  fi
done
