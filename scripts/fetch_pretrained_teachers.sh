#!/usr/bin/env bash
# Downloads the published teachers and verifies each one.
#
#   bash scripts/fetch_pretrained_teachers.sh                          # the six CIFAR-100 teachers
#   bash scripts/fetch_pretrained_teachers.sh resnet32x4 vgg13
#   bash scripts/fetch_pretrained_teachers.sh --imagenet               # torchvision ResNet-34, ResNet-50
#   bash scripts/fetch_pretrained_teachers.sh --imagenet resnet18      # any row of the table
#   bash scripts/fetch_pretrained_teachers.sh --imagenet resnet50=resnet50-11ad3fa6.pth
#   bash scripts/fetch_pretrained_teachers.sh --deit                   # mmcls's DeiT III-S (DeiT table)
#
# CIFAR-100: RepDistiller's teachers (the ones the TTM paper uses) go to
# <dest>/<arch>_vanilla/ckpt_epoch_240.pth. Each is first asked of the per-file host; the
# teachers it cannot deliver are then taken from mdistiller's release archive
# cifar_teachers.tar (members cifar_teachers/<arch>_vanilla/ckpt_epoch_240.pth; nothing else in
# it is extracted: no links, no other paths). Every file is loaded with weights_only=True into
# its architecture (python -m teacher_zoo check); a file that fails is deleted.
#
# ImageNet: torchvision's IMAGENET1K_V1 files of the table in teacher_zoo/published.py
# (IMAGENET_TEACHERS; python -m teacher_zoo.fetch imagenet-files prints it) go to
# <dest>/<arch>_imagenet/<file>, where train_student.py --path_t reads the architecture from the
# folder name. ARCH=FILE fetches another file of the same server (its name must carry its
# SHA-256 prefix) into <arch>_imagenet/FILE. Each file's SHA-256 must start with the hex digits
# after the last '-' of its name (a file that fails is deleted); when models.model_dict has the
# architecture, the file must also load into it (1000 classes).
#
# DeiT: the DeiT table's teacher, mmcls's DeiT III-S file of DEIT_TEACHERS
# (deit3-small-p16_in21k-pre_3rdparty_in1k_20221009-dcd90827.pth, SHA-256 prefix dcd90827), goes
# to <dest>/deit3_small_patch16_224_imagenet/<file> as downloaded: nothing is converted on disk
# (train_student.py maps mmcls's keys to ours when it loads the file). It is checked as the
# ImageNet files are (SHA-256 prefix, then a strict load into deit3_small_patch16_224, 1000
# classes); ARCH=FILE works as there.
#
# Environment:
#   KD_TEACHER_URL           per-file base (default http://shape2prog.csail.mit.edu/repo, down
#                            for years); a mirror serves <base>/<arch>_vanilla/ckpt_epoch_240.pth
#   KD_TEACHER_TAR_URL       the archive (default mdistiller's release asset cifar_teachers.tar)
#   KD_TEACHER_IMAGENET_URL  base holding torchvision's file names (default
#                            https://download.pytorch.org/models)
#   KD_TEACHER_DEIT_URL      base holding mmcls's DeiT file names (default
#                            https://download.openmmlab.com/mmclassification/v0/deit3)
#   KD_TEACHER_DIR           destination root (default save/models; relative to the repository)
#   PYTHON                   interpreter for the checks (default .venv/bin/python, else python3)
#
# Downloads go to <file>.part (the archive to <dest>/cifar_teachers.tar.part) and resume from
# there; a transfer that breaks off (or stalls below 1 KB/s for 30 s) is retried. A host that
# cannot be reached is tried once (connect timeout 10 s, name lookup included) and not asked
# again for the other files, so an offline run ends within about 20 s; folders the run
# created and left empty are removed, and so are empty partial files. A file
# already in place is checked and kept when it is valid. Exit status: 0 when every requested
# teacher is present and valid, 1 otherwise, 2 on a usage error.
set -u -o pipefail

cd "$(dirname "$0")/.." || exit 2
BASE="${KD_TEACHER_URL:-http://shape2prog.csail.mit.edu/repo}"
BASE="${BASE%/}"
TAR_URL="${KD_TEACHER_TAR_URL:-https://github.com/megvii-research/mdistiller/releases/download/checkpoints/cifar_teachers.tar}"
IMAGENET_BASE="${KD_TEACHER_IMAGENET_URL:-}"
DEIT_BASE="${KD_TEACHER_DEIT_URL:-}"
DEST="${KD_TEACHER_DIR:-save/models}"
ALL=(wrn_40_2 resnet56 resnet110 resnet32x4 vgg13 ResNet50)
ATTEMPTS=3          # per file; only a transfer that broke off or a 408/429/5xx answer is retried
CONNECT_TIMEOUT=10  # seconds, name lookup included

if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi

usage() {
  echo "usage: $0 [$(IFS='|'; echo "${ALL[*]}") ...]" >&2
  echo "       $0 --imagenet [ARCH[=FILE] ...]   (default: the paper's ResNet-34 and ResNet-50)" >&2
  echo "       $0 --deit [ARCH[=FILE] ...]       (default: mmcls's DeiT III-S, the DeiT table's teacher)" >&2
  exit 2
}
MODE=cifar
case "${1:-}" in
  --imagenet) MODE=imagenet; shift ;;
  --deit) MODE=deit; shift ;;
  -h|--help) sed -n '2,/^set -u/p' "scripts/$(basename "$0")" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  -*) echo "error: unknown option '$1'" >&2; usage ;;
esac
archs=("$@")
if [ "$MODE" = cifar ]; then
  [ ${#archs[@]} -eq 0 ] && archs=("${ALL[@]}")
  for a in "${archs[@]}"; do
    case " ${ALL[*]} " in *" $a "*) ;; *) echo "error: unknown teacher '$a'" >&2; usage ;; esac
  done
fi

if command -v curl >/dev/null 2>&1; then TOOL=curl
elif command -v wget >/dev/null 2>&1; then TOOL=wget
else echo "error: need curl or wget to download the teachers" >&2; exit 2; fi

# ---- folders: remember what this run creates, remove what it leaves empty -----------------
CREATED=()
STAGING=""
make_dir() {
  local dir=$1 new=()
  while [ ! -d "$dir" ]; do new=("$dir" ${new[@]+"${new[@]}"}); dir=$(dirname "$dir"); done
  mkdir -p "$1" && CREATED+=(${new[@]+"${new[@]}"})
}
cleanup() {
  [ -n "$STAGING" ] && rm -rf "$STAGING"
  local i f
  for ((i = ${#CREATED[@]} - 1; i >= 0; i--)); do
    for f in "${CREATED[i]}"/*.part; do [ -f "$f" ] && [ ! -s "$f" ] && rm -f "$f"; done
    rmdir "${CREATED[i]}" 2>/dev/null
  done
  return 0
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

size() { if [ -e "$1" ]; then wc -c <"$1" | tr -d ' '; else echo 0; fi; }

# ---- downloads ------------------------------------------------------------------------------
# download URL PART: one attempt that appends to PART (resuming it when non-empty); sets
# HTTP_CODE (000: no answer; curl only) and returns the tool's exit status.
download() {
  local url=$1 part=$2 rc
  if [ "$TOOL" = curl ]; then
    local progress=(--progress-bar)
    [ -t 2 ] || progress=(--silent --show-error)
    HTTP_CODE=$(curl --fail --location --connect-timeout "$CONNECT_TIMEOUT" \
      --speed-limit 1024 --speed-time 30 "${progress[@]}" --continue-at - \
      --output "$part" --write-out '%{http_code}' "$url"); rc=$?
  else
    local progress=(--progress=bar:force)
    [ -t 2 ] || progress=(--no-verbose)
    wget --tries=1 --connect-timeout="$CONNECT_TIMEOUT" --dns-timeout="$CONNECT_TIMEOUT" \
      --read-timeout=30 "${progress[@]}" --continue --output-document="$part" "$url"; rc=$?
    HTTP_CODE=""
  fi
  return $rc
}

# fetch_url URL PART LABEL: 0 when the download completed; 2 when the host gave no answer at
# all (nothing to retry); 1 otherwise (PART is kept when it holds bytes: it may be complete,
# e.g. a 416 answer to resuming a finished file, or resumable later).
fetch_url() {
  local url=$1 part=$2 label=$3 attempt rc before
  for attempt in $(seq "$ATTEMPTS"); do
    before=$(size "$part")
    download "$url" "$part"; rc=$?
    [ $rc -eq 0 ] && return 0
    if [ "$TOOL" = curl ] && { [ $rc -eq 33 ] || [ $rc -eq 36 ]; }; then
      rm -f "$part"  # the server cannot resume this .part: start it over
    elif [ "$(size "$part")" -le "$before" ]; then  # nothing arrived
      if { [ "$TOOL" = curl ] && [ "$HTTP_CODE" = 000 ]; } || { [ "$TOOL" = wget ] && [ $rc -eq 4 ]; }; then
        echo "$label: no answer from $url ($TOOL exit $rc)" >&2
        return 2
      fi
      case "$HTTP_CODE" in 408|429|5??) ;; *) return 1 ;; esac
    fi
    [ "$attempt" -lt "$ATTEMPTS" ] && { echo "$label: attempt $attempt failed ($TOOL exit $rc); retrying" >&2; sleep 1; }
  done
  return 1
}

# check FILE ARCH: 0 valid, 3 invalid (message on stderr), anything else: the checker failed.
check() { "$PY" -m teacher_zoo check "$1" --arch "$2" --num_classes "${3:-100}" >/dev/null; }

# ---- CIFAR-100 ------------------------------------------------------------------------------
FILE_HOST_DOWN=0
failed=()

# present_cifar ARCH FILE: 0 when FILE is in place and valid; 1 when it is not (an invalid one
# is deleted); 2 when the checker could not run.
present_cifar() {
  local arch=$1 file=$2 rc
  [ -e "$file" ] || return 1
  check "$file" "$arch"; rc=$?
  if [ $rc -eq 0 ]; then echo "$arch: already present and valid ($file)"; return 0; fi
  [ $rc -eq 3 ] || { echo "error: $arch: could not run the checker ($PY)" >&2; return 2; }
  echo "$arch: the file in place is not a valid $arch checkpoint; deleted it and downloading again" >&2
  rm -f "$file"
  return 1
}

# fetch_file ARCH FILE: the per-file host; 0 when FILE is now in place and valid.
fetch_file() {
  local arch=$1 file=$2 rc
  local part="$file.part" url="$BASE/${arch}_vanilla/ckpt_epoch_240.pth"
  [ $FILE_HOST_DOWN -eq 1 ] && return 1
  make_dir "$(dirname "$file")"
  [ -s "$part" ] && echo "$arch: resuming the partial download ($(size "$part") bytes so far)"
  echo "$arch: downloading $url"
  fetch_url "$url" "$part" "$arch"; rc=$?
  if [ $rc -eq 2 ]; then
    FILE_HOST_DOWN=1
    echo "$arch: the per-file host $BASE cannot be reached; the archive will be tried instead" >&2
  fi
  if [ $rc -ne 0 ]; then
    # The .part may already hold the whole file: resuming a finished download fails.
    if [ -s "$part" ] && check "$part" "$arch" 2>/dev/null; then
      echo "$arch: the partial download was already complete"
    else
      if [ -s "$part" ]; then
        echo "$arch: download from $url broke off; partial file kept at $part" >&2
      else
        rm -f "$part"
        [ $rc -eq 1 ] && echo "$arch: download failed from $url" >&2
      fi
      return 1
    fi
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
  echo "$arch: ok ($file, $(size "$file") bytes)"
}

# fetch_archive ARCH...: the teachers the per-file host did not deliver, from the archive.
fetch_archive() {
  local part="$DEST/cifar_teachers.tar.part" rc xrc arch file missing=()
  make_dir "$DEST"
  [ -s "$part" ] && echo "archive: resuming the partial download ($(size "$part") bytes so far)"
  echo "archive: downloading $TAR_URL (for $*)"
  fetch_url "$TAR_URL" "$part" archive; rc=$?
  if [ $rc -ne 0 ] && [ ! -s "$part" ]; then
    rm -f "$part"
    echo "error: $(IFS=,; echo "$*" | sed 's/,/, /g'): download failed: neither $BASE nor the" \
      "archive $TAR_URL delivered $([ $# -eq 1 ] && echo it || echo them)" \
      "(set KD_TEACHER_URL or KD_TEACHER_TAR_URL to a mirror)" >&2
    failed+=("$@")
    return
  fi
  # A failed resume may still leave a complete archive (416), and the members before a break
  # are whole: extract what is there; each file is checked anyway.
  STAGING=$(mktemp -d "$DEST/.cifar_teachers.XXXXXX") || { failed+=("$@"); return; }
  "$PY" -m teacher_zoo.fetch extract-cifar "$part" "$STAGING" "$@" >/dev/null; xrc=$?
  if [ $xrc -ne 0 ]; then
    if [ $xrc -eq 3 ] && [ $rc -eq 0 ]; then
      rm -f "$part"
      echo "error: the file at $TAR_URL is not a tar archive (wrong file or address); deleted it" >&2
    elif [ $xrc -eq 3 ]; then
      echo "error: archive: download broke off; partial file kept at $part, run again to resume" >&2
    else
      echo "error: archive: could not run the extraction ($PY)" >&2
    fi
    failed+=("$@")
    return
  fi
  for arch in "$@"; do
    file="$DEST/${arch}_vanilla/ckpt_epoch_240.pth"
    local staged="$STAGING/cifar_teachers/${arch}_vanilla/ckpt_epoch_240.pth"
    if [ ! -f "$staged" ]; then
      echo "error: $arch: download failed: not in the archive$([ $rc -eq 0 ] || echo "'s downloaded part")" \
        "from $TAR_URL as cifar_teachers/${arch}_vanilla/ckpt_epoch_240.pth" >&2
      missing+=("$arch"); continue
    fi
    if ! check "$staged" "$arch"; then
      echo "error: $arch: the archive's file is not a valid $arch checkpoint; not installed" >&2
      missing+=("$arch"); continue
    fi
    make_dir "$(dirname "$file")"
    mv -f "$staged" "$file" && rm -f "$file.part"
    echo "$arch: ok ($file, $(size "$file") bytes, from the archive)"
  done
  rm -rf "$STAGING"; STAGING=""
  if [ $rc -eq 0 ] || [ ${#missing[@]} -eq 0 ]; then
    rm -f "$part"  # the archive is not kept: what it had to give is in place
  else
    echo "archive: download broke off; partial file kept at $part, run again to resume" >&2
  fi
  failed+=(${missing[@]+"${missing[@]}"})
}

fetch_cifar() {
  local arch file rc todo=()
  for arch in "$@"; do
    file="$DEST/${arch}_vanilla/ckpt_epoch_240.pth"
    present_cifar "$arch" "$file"; rc=$?
    [ $rc -eq 0 ] && continue
    [ $rc -eq 2 ] && { failed+=("$arch"); continue; }
    fetch_file "$arch" "$file" || todo+=("$arch")
  done
  [ ${#todo[@]} -gt 0 ] && fetch_archive "${todo[@]}"
}

# ---- ImageNet -------------------------------------------------------------------------------
IMAGENET_HOST_DOWN=0

# sha_ok FILE NAME: does FILE's SHA-256 start with the prefix NAME carries?
sha_ok() { "$PY" -m teacher_zoo.fetch sha256 "$1" --name "$2" 2>/dev/null; }

# load_check ARCH FILE REGISTERED: loads FILE into our ARCH when models.model_dict has it.
load_check() {
  local arch=$1 file=$2 rc
  if [ "$3" != yes ]; then
    echo "$arch: no $arch in models.model_dict yet: skipped the load check (the SHA-256 matched)"
    return 0
  fi
  check "$file" "$arch" 1000; rc=$?
  [ $rc -eq 0 ] && { echo "$arch: loads into our $arch (weights_only, strict)"; return 0; }
  if [ $rc -eq 3 ]; then
    echo "error: $arch: the file matches its SHA-256 but does not load into our $arch; kept it ($file)" >&2
  else
    echo "error: $arch: could not run the checker ($PY)" >&2
  fi
  return 1
}

# fetch_imagenet ARCH FILE URL REGISTERED: 0 when <dest>/<arch>_imagenet/FILE is in place and valid.
fetch_imagenet() {
  local arch=$1 name=$2 url=$3 registered=$4 rc
  local file="$DEST/${arch}_imagenet/$name"
  local part="$file.part"
  if [ -e "$file" ]; then
    if sha_ok "$file" "$name"; then
      echo "$arch: already present and valid ($file)"
      load_check "$arch" "$file" "$registered"; return
    fi
    echo "$arch: the file in place does not match its SHA-256; deleted it and downloading again" >&2
    rm -f "$file"
  fi
  if [ $IMAGENET_HOST_DOWN -eq 1 ]; then
    echo "error: $arch: download failed: the host of $url cannot be reached" >&2; return 1
  fi
  make_dir "$(dirname "$file")"
  [ -s "$part" ] && echo "$arch: resuming the partial download ($(size "$part") bytes so far)"
  echo "$arch: downloading $url"
  fetch_url "$url" "$part" "$arch"; rc=$?
  [ $rc -eq 2 ] && IMAGENET_HOST_DOWN=1
  if [ $rc -ne 0 ]; then
    if [ -s "$part" ] && sha_ok "$part" "$name"; then
      echo "$arch: the partial download was already complete"
    elif [ -s "$part" ]; then
      echo "error: $arch: download failed; partial file kept at $part, run again to resume" >&2
      return 1
    else
      rm -f "$part"
      echo "error: $arch: download failed from $url (set $MIRROR_VAR to a mirror holding $name)" >&2
      return 1
    fi
  fi
  if ! sha_ok "$part" "$name"; then
    rm -f "$part"
    echo "error: $arch: the downloaded file's SHA-256 does not start with the prefix in its name $name" \
      "(truncated or wrong file); deleted it" >&2
    return 1
  fi
  mv -f "$part" "$file"
  echo "$arch: ok ($file, $(size "$file") bytes, SHA-256 matches)"
  load_check "$arch" "$file" "$registered"
}

# fetch_imagenet_all [--deit] ARCH...: torchvision's files, or with --deit mmcls's DeiT files.
MIRROR_VAR=KD_TEACHER_IMAGENET_URL
fetch_imagenet_all() {
  local table rc base=() kind=() rows=() row arch name url registered mirror=$IMAGENET_BASE label=ImageNet
  if [ "${1:-}" = --deit ]; then
    shift; kind=(--deit); mirror=$DEIT_BASE; MIRROR_VAR=KD_TEACHER_DEIT_URL; label=DeiT
  fi
  [ -n "$mirror" ] && base=(--base "$mirror")
  table=$("$PY" -m teacher_zoo.fetch imagenet-files ${kind[@]+"${kind[@]}"} ${base[@]+"${base[@]}"} "$@"); rc=$?
  [ $rc -eq 2 ] && usage
  [ $rc -eq 0 ] || { echo "error: could not read the $label teacher table ($PY)" >&2; exit 1; }
  while IFS= read -r row; do [ -n "$row" ] && rows+=("$row"); done <<<"$table"
  archs=()
  for row in "${rows[@]}"; do
    IFS=$'\t' read -r arch name url registered <<<"$row"
    archs+=("$arch")
    fetch_imagenet "$arch" "$name" "$url" "$registered" || failed+=("$arch")
  done
}

if [ "$MODE" = cifar ]; then
  fetch_cifar "${archs[@]}"
elif [ "$MODE" = deit ]; then
  fetch_imagenet_all --deit ${archs[@]+"${archs[@]}"}
else
  fetch_imagenet_all ${archs[@]+"${archs[@]}"}
fi
if [ ${#failed[@]} -gt 0 ]; then
  echo "error: ${#failed[@]} teacher(s) missing or invalid: ${failed[*]}" >&2
  exit 1
fi
echo "all ${#archs[@]} teacher(s) present and valid under $DEST"
