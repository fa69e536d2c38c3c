#!/usr/bin/env bash
# Downloads RepDistiller's published CIFAR-100 teachers (the ones the TTM paper uses) into
# save/models/<arch>_vanilla/ckpt_epoch_240.pth and verifies each one.
#
#   bash scripts/fetch_pretrained_teachers.sh                 # all six
#   bash scripts/fetch_pretrained_teachers.sh resnet32x4 vgg13
#
# Environment:
#   KD_TEACHER_URL  base address (default http://shape2prog.csail.mit.edu/repo); a mirror must
#                   serve <base>/<arch>_vanilla/ckpt_epoch_240.pth
#   KD_TEACHER_DIR  destination root (default save/models; relative to the repository root)
#   PYTHON          interpreter used for the check (default .venv/bin/python, else python3)
#
# Downloads go to <file>.part and resume from there (interrupted runs continue where they
# stopped); each is retried a few times. A file already in place is checked and kept when it
# is valid. Every file is loaded with weights_only=True into its architecture (keys and
# shapes must match); a file that fails is deleted, never left in place. Exit status: 0 when
# every requested teacher is present and valid, 1 otherwise, 2 on a usage error.
set -u -o pipefail

cd "$(dirname "$0")/.." || exit 2
BASE="${KD_TEACHER_URL:-http://shape2prog.csail.mit.edu/repo}"
BASE="${BASE%/}"
DEST="${KD_TEACHER_DIR:-save/models}"
ALL=(wrn_40_2 resnet56 resnet110 resnet32x4 vgg13 ResNet50)
ATTEMPTS=3

if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi

usage() { echo "usage: $0 [$(IFS='|'; echo "${ALL[*]}") ...]" >&2; exit 2; }
archs=("$@")
[ ${#archs[@]} -eq 0 ] && archs=("${ALL[@]}")
for a in "${archs[@]}"; do
  case " ${ALL[*]} " in *" $a "*) ;; *) echo "error: unknown teacher '$a'" >&2; usage ;; esac
done

if command -v curl >/dev/null 2>&1; then TOOL=curl
elif command -v wget >/dev/null 2>&1; then TOOL=wget
else echo "error: need curl or wget to download the teachers" >&2; exit 2; fi

# check FILE ARCH: 0 valid, 3 invalid (message on stderr), anything else: the checker failed.
check() { "$PY" -m helper.teachers check "$1" --arch "$2" --num_classes 100 >/dev/null; }

# download URL PART: one attempt that appends to PART (resuming it when non-empty).
download() {
  local url=$1 part=$2
  if [ "$TOOL" = curl ]; then
    local progress=(--progress-bar)
    [ -t 2 ] || progress=(--silent --show-error)
    curl --fail --location --retry 3 --retry-delay 2 --connect-timeout 30 \
      "${progress[@]}" --continue-at - --output "$part" "$url"
  else
    local progress=(--progress=bar:force)
    [ -t 2 ] || progress=(--no-verbose)
    wget --tries=3 --timeout=30 "${progress[@]}" --continue --output-document="$part" "$url"
  fi
}

fetch_one() {
  local arch=$1
  local file="$DEST/${arch}_vanilla/ckpt_epoch_240.pth"
  local part="$file.part" url="$BASE/${arch}_vanilla/ckpt_epoch_240.pth" rc
  if [ -e "$file" ]; then
    check "$file" "$arch"; rc=$?
    if [ $rc -eq 0 ]; then echo "$arch: already present and valid ($file)"; return 0; fi
    [ $rc -eq 3 ] || { echo "error: $arch: could not run the checker ($PY)" >&2; return 1; }
    echo "$arch: the file in place is not a valid $arch checkpoint; deleted it and downloading again" >&2
    rm -f "$file"
  fi
  mkdir -p "$(dirname "$file")"
  [ -s "$part" ] && echo "$arch: resuming the partial download ($(wc -c <"$part") bytes so far)"
  echo "$arch: downloading $url"
  local attempt ok=0
  for attempt in $(seq "$ATTEMPTS"); do
    download "$url" "$part"; rc=$?
    if [ $rc -eq 0 ]; then ok=1; break; fi
    # The .part may already hold the whole file: resuming a finished download fails.
    if [ -s "$part" ] && check "$part" "$arch" 2>/dev/null; then
      echo "$arch: the partial download was already complete"; ok=1; break
    fi
    # curl 33/36: the server cannot resume this .part, so start it over.
    if [ "$TOOL" = curl ] && { [ $rc -eq 33 ] || [ $rc -eq 36 ]; }; then rm -f "$part"; fi
    [ "$attempt" -lt "$ATTEMPTS" ] && { echo "$arch: attempt $attempt failed (exit $rc); retrying" >&2; sleep 2; }
  done
  if [ $ok -ne 1 ]; then
    if [ -s "$part" ]; then
      echo "error: $arch: download failed; partial file kept at $part, run again to resume" >&2
    else
      rm -f "$part"
      echo "error: $arch: download failed from $url (set KD_TEACHER_URL to a mirror)" >&2
    fi
    return 1
  fi
  check "$part" "$arch"; rc=$?
  if [ $rc -ne 0 ]; then
    rm -f "$part"
    if [ $rc -eq 3 ]; then
      echo "error: $arch: the downloaded file is not a valid $arch checkpoint (truncated or wrong file); deleted it" >&2
    else
      echo "error: $arch: could not run the checker ($PY); deleted the download" >&2
    fi
    return 1
  fi
  mv -f "$part" "$file"
  echo "$arch: ok ($file, $(wc -c <"$file") bytes)"
}

failed=()
for arch in "${archs[@]}"; do
  fetch_one "$arch" || failed+=("$arch")
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "error: ${#failed[@]} teacher(s) missing or invalid: ${failed[*]}" >&2
  exit 1
fi
echo "all ${#archs[@]} teacher(s) present and valid under $DEST"
