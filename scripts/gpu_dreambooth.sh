#!/usr/bin/env bash
# DreamBooth on the toy world (issue 12): personalise both shipped priors on N_VIEWS renders of
# the held-out pink duck (never in their training data) under "a sks duck" (recipe
# dreambooth_priors), then grade each prior with the evaluator (python -m magic3d.eval
# dreambooth): samples of "a sks duck" seen as a pink duck (target >= 0.8) against the untuned
# prior's "a pink duck", language drift on the other ducks and the other pink objects (target:
# within 0.05), LoRA size and training time. Prints one table; one tar comes back in $OUT.
# WITH_3D=1 also runs text-to-3D (coarse_to_fine): "a sks duck" with the adapters (what recipe
# dreambooth runs after personalising) and "a pink duck" untuned, graded by `magic3d.eval run`
# against the pink duck's ground truth.
# Usage: bash scripts/gpu_dreambooth.sh
#   OVERRIDES: for the personalisation (personalise_pixel:key=value targets one stage);
#   UNTUNED_OVERRIDES: for the two coarse_to_fine runs. CPU check of every part:
#   PROFILE=cpu N_IMAGES=2 DRIFT=1 SAMPLE_STEPS=2 DRIFT_SHAPES=cube DRIFT_COLOURS=red WITH_3D=1 \
#     OVERRIDES="trainer.max_steps=2 data.steps_per_epoch=2 run.checkpoint_every=2 run.video_views=2
#       model.preview_every=0 personalise_pixel:model.n_class_images=1 personalise_latent:model.n_class_images=1"
#     UNTUNED_OVERRIDES="trainer.max_steps=2 data.steps_per_epoch=2 run.checkpoint_every=2 run.video_views=2"
#     bash scripts/gpu_dreambooth.sh
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
PROFILE=${PROFILE:-full}; N_VIEWS=${N_VIEWS:-5}; N_IMAGES=${N_IMAGES:-64}; DRIFT=${DRIFT:-4}
SAMPLE_STEPS=${SAMPLE_STEPS:-50}; WITH_3D=${WITH_3D:-0}; OVERRIDES=${OVERRIDES:-}; UNTUNED_OVERRIDES=${UNTUNED_OVERRIDES:-}
DRIFT_SHAPES=${DRIFT_SHAPES:-}; DRIFT_COLOURS=${DRIFT_COLOURS:-}
WORK=${WORK:-/tmp/dreambooth}
python3 -c "import peft" 2>/dev/null || { echo "peft is not importable: put its wheel and accelerate's in .whl/"; exit 2; }
nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || echo "no GPU (CPU check)"
rm -rf "$WORK"; mkdir -p "$WORK/logs"
start=$(date +%s)
python3 -c "from magic3d.toyworld.subject import render_subject_photos as r; r('$WORK/subject', n_views=$N_VIEWS, size=256)" || exit 1
# shellcheck disable=SC2086
python3 -m magic3d run dreambooth_priors --profile "$PROFILE" --prompt "a sks duck" --subject "$WORK/subject" \
    --run "$WORK/run" $OVERRIDES > "$WORK/logs/personalise.log" 2>&1
code=$?; echo "personalisation: exit $code after $(( $(date +%s) - start )) s"; tail -3 "$WORK/logs/personalise.log"
[ $code -eq 0 ] || { tar -cf "$OUT/dreambooth.tar" -C "$WORK" logs; exit $code; }
python3 - "$WORK" "$N_IMAGES" "$DRIFT" "$SAMPLE_STEPS" "$DRIFT_SHAPES" "$DRIFT_COLOURS" <<'PY' 2>&1 | tee "$WORK/logs/eval.log"
import json, sys
from pathlib import Path
from magic3d.eval.dreambooth import evaluate_personalisation, personalisation_markdown

work, n_images, drift, steps = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
shapes, colours = tuple(sys.argv[5].split()), tuple(sys.argv[6].split())
results = []
for kind in ("pixel", "latent"):
    stage = work / "run" / f"personalise_{kind}"
    result = evaluate_personalisation(f"priors/{kind}", stage / "lora", n_images=n_images, n_per_drift_caption=drift,
                                      drift_shapes=shapes, drift_colours=colours, steps=steps)
    (work / f"eval_{kind}.json").write_text(json.dumps(result.to_json(), indent=2) + "\n")
    done = json.loads((stage / "DONE.json").read_text())
    print(f"{kind}: stage {done['seconds_this_attempt']} s (class images + {done['steps']} steps), "
          f"peak GPU {done['peak_gpu_gib']} GiB, graded in {result.seconds} s")
    results.append(result)
table = personalisation_markdown(results)
(work / "dreambooth.md").write_text(table)
print(table)
PY
if [ "$WITH_3D" = 1 ]; then
    # The recipe dreambooth's text-to-3D half with the adapters made above: the same coarse_to_fine
    # stages as the untuned baseline, only the guidance's lora differs.
    # shellcheck disable=SC2086
    python3 -m magic3d run coarse_to_fine --profile "$PROFILE" --prompt "a sks duck" --run "$WORK/tuned" \
        "coarse:model.guidance.lora=$WORK/run/personalise_pixel/lora" \
        "fine:model.guidance.lora=$WORK/run/personalise_latent/lora" \
        $UNTUNED_OVERRIDES > "$WORK/logs/tuned_3d.log" 2>&1; echo "tuned text-to-3D: exit $?"
    # shellcheck disable=SC2086
    python3 -m magic3d run coarse_to_fine --profile "$PROFILE" --prompt "a pink duck" --run "$WORK/untuned" \
        $UNTUNED_OVERRIDES > "$WORK/logs/untuned_3d.log" 2>&1; echo "untuned text-to-3D: exit $?"
    # "a sks duck" stands for the subject: its stages are graded as "a pink duck" (ground truth).
    python3 -m magic3d.eval run "$WORK/untuned" > "$WORK/logs/eval_untuned_3d.log" 2>&1
    python3 -m magic3d.eval run "$WORK/tuned" --as-prompt "a pink duck" > "$WORK/logs/eval_tuned_3d.log" 2>&1
    tail -n 14 "$WORK"/logs/eval_*_3d.log
    cp -r "$WORK/untuned/eval" "$WORK/pack_untuned_eval" 2>/dev/null; cp -r "$WORK/tuned/eval" "$WORK/pack_tuned_eval" 2>/dev/null
fi
echo "done after $(( $(date +%s) - start )) s"
mkdir -p "$WORK/pack"; cp -r "$WORK/logs" "$WORK"/eval_*.json "$WORK/dreambooth.md" "$WORK/subject" "$WORK/pack/" 2>/dev/null
cp -r "$WORK"/pack_*_eval "$WORK/pack/" 2>/dev/null
for kind in pixel latent; do
    s="$WORK/run/personalise_$kind"; mkdir -p "$WORK/pack/$kind"
    cp -r "$s/lora" "$s/DONE.json" "$s/samples.png" "$WORK/pack/$kind/" 2>/dev/null
    cp "$(ls "$s"/train/*.png 2>/dev/null | tail -1)" "$WORK/pack/$kind/preview_last.png" 2>/dev/null
done
tar -cf "$OUT/dreambooth.tar" -C "$WORK/pack" .
