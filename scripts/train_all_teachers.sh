#!/usr/bin/env bash
# Trains the paper's six CIFAR-100 teachers with train_teacher.py (the offline route; the
# other is scripts/fetch_pretrained_teachers.sh) and puts each one's best checkpoint where the
# fetch script would: save/models/<arch>_vanilla/ckpt_epoch_240.pth.
#
#   bash scripts/train_all_teachers.sh                        # all six, one after the other
#   bash scripts/train_all_teachers.sh resnet32x4 vgg13 --device cuda:1
#   bash scripts/train_all_teachers.sh resnet8 --dataset digits --epochs 1   # a smoke test
#
# Leading arguments that are not options name the architectures to train (default: the six
# teachers; any registered model works, e.g. resnet8 for a quick test). Everything else is
# passed to train_teacher.py unchanged; it also gets --model <arch> --resume from here, so
# running this again continues interrupted trainings. Relative paths are taken from the
# repository root. A teacher already in place and valid is skipped: delete
# the file to retrain it. The training runs themselves stay in train_teacher.py's own folders
# (save/models/<arch>_<dataset>_lr_..._trial_<N>/); the destination is a hard link (or a copy)
# of the best checkpoint there.
#
# Environment: KD_TEACHER_DIR destination root (default save/models); KD_TEACHER_PICK best
# (default) or last: which checkpoint of the run to place (RepDistiller's published files are
# their runs' epoch-240 state); PYTHON interpreter (default .venv/bin/python, else python3).
# Exit status 0 when every teacher is in place.
set -u -o pipefail

cd "$(dirname "$0")/.." || exit 2
DEST="${KD_TEACHER_DIR:-save/models}"
PICK="${KD_TEACHER_PICK:-best}"
case "$PICK" in best|last) ;; *) echo "error: KD_TEACHER_PICK must be best or last" >&2; exit 2 ;; esac
ALL=(wrn_40_2 resnet56 resnet110 resnet32x4 vgg13 ResNet50)
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi

archs=()
while [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; do archs+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
[ ${#archs[@]} -eq 0 ] && archs=("${ALL[@]}")

failed=()
for arch in "${archs[@]}"; do
  dest="$DEST/${arch}_vanilla/ckpt_epoch_240.pth"
  if [ -e "$dest" ] && "$PY" -m teacher_zoo check "$dest" --arch "$arch" >/dev/null 2>&1; then
    echo "$arch: already in place ($dest); delete it to retrain"
    continue
  fi
  echo "$arch: training with train_teacher.py --model $arch $*"
  out=$(mktemp)
  # train_teacher.main returns the path of the run's best checkpoint.
  if ! "$PY" -c 'import sys, train_teacher; open(sys.argv[1], "w").write(train_teacher.main(sys.argv[2:]))' \
      "$out" --model "$arch" --resume "$@" || [ ! -s "$out" ]; then
    echo "error: $arch: training failed" >&2
    failed+=("$arch"); rm -f "$out"; continue
  fi
  best=$(cat "$out"); rm -f "$out"
  [ "$PICK" = last ] && best="${best%_best.pth}_last.pth"
  mkdir -p "$(dirname "$dest")"
  { ln -f "$best" "$dest.tmp" 2>/dev/null || cp "$best" "$dest.tmp"; } && mv -f "$dest.tmp" "$dest"
  if "$PY" -m teacher_zoo check "$dest" --arch "$arch"; then
    echo "$arch: $PICK checkpoint $best -> $dest"
  else
    rm -f "$dest"; failed+=("$arch")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "error: ${#failed[@]} teacher(s) not in place: ${failed[*]}" >&2
  exit 1
fi
echo "all ${#archs[@]} teacher(s) in place under $DEST"
