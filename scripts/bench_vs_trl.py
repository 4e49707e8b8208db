"""rlkit against TRL's GRPOTrainer at equal work, alternating A B A B on the same machine.

The same local model (a random-init one with rlkit's byte tokenizer and chat template, or the
real pretrained SmolLM2-135M-Instruct with its own; nothing is downloaded), the same pair_sum
prompts in the model's chat template, 16 prompts x 8 completions of up to 40 tokens (no stop
string: a random model rarely ends early, so both generate about the same tokens), LoRA rank 64
with alpha 32 on every linear layer but the output one, no KL, one optimizer step per batch,
AdamW at the same learning rate, float32, the same thread count. The reward is the fraction of
digits in the completion: it varies on random text, so no group is skipped, and it can be
learned, so the reward after N steps says whether both still train.

Each segment is one process that loads the model, takes one warm-up step and then `--steps`
timed steps: rlkit through its CLI (`python -m rlkit`, step times from timings.jsonl), TRL
through `GRPOTrainer.train()` with a callback timing each step. Segments alternate rlkit, TRL,
rlkit, TRL, ... `--repeats` times. TRL runs from its own environment (`--trl-python`): nothing
of TRL is in rlkit's dependencies.

    python -m venv /tmp/trl-venv && /tmp/trl-venv/bin/pip install torch==2.13.0 trl
    python scripts/bench_vs_trl.py --trl-python /tmp/trl-venv/bin/python
    python scripts/bench_vs_trl.py --sizes small --steps 3 --repeats 1   # a quick look
    python scripts/bench_vs_trl.py --sizes smollm2   # the real pretrained model (make setup)

It prints, per size and framework: seconds per step (median, min, max over every timed step),
completion tokens per step, peak resident memory, the mean reward over the first and the last
timed steps, and rlkit's step time as a fraction of TRL's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Model shapes (hidden, MLP, layers, heads, kv heads, head dim), Qwen3-style, byte vocabulary.
SIZES = {
    "small": None,  # rlkit-small, 1.8M parameters (the CPU default's model)
    "25m": (512, 1536, 8, 8, 4, 64),
    # The real pretrained model (rlkit's smollm2-135m-instruct, converted from its GGUF file):
    # a 49k-token BPE vocabulary makes the output layer and the logprob pass a large share.
    "smollm2": "smollm2-135m-instruct",
}
GROUPS, GROUP_SIZE, MAX_TOKENS, RANK, ALPHA, LR = 16, 8, 40, 64, 32.0, 3e-4


def digit_fraction(completions, problem=None, **_) -> list[float]:
    """The reward both frameworks train on: the fraction of a completion's characters that are
    digits (plain python: TRL's environment imports it too)."""
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
    return 0


# ---- rlkit -----------------------------------------------------------------------------------
def model_path(size: str) -> str:
    from rlkit.backend import models

    if SIZES[size] is None:
        return str(models.builtin_path("rlkit-small"))
    if isinstance(SIZES[size], str):
        return models.resolve(SIZES[size])
    name = f"bench-trl-{size}"
    models.BUILTIN_MODELS[name] = models.BuiltinSpec(*SIZES[size])
    return str(models.builtin_path(name))


def write_prompts(path: Path, n_steps: int) -> None:
    """The pair_sum prompts of rlkit's first `n_steps` steps (seed 0), as chat messages."""
    from rlkit.run import seeds
    from rlkit.run.build import as_callable
    from rlkit.run.config import compose

    cfg = compose(["recipe=pair_sum"])
    env = as_callable(cfg.env, "env")
    prompts = []
    for step in range(n_steps):
        for problem in env.sample(seeds.rng(cfg.seed, "problems", step), GROUPS, step):
            prompts.append([dict(m) for m in problem.messages])
    path.write_text(json.dumps(prompts))


def rlkit_segment(path: str, steps: int, run_dir: Path, threads: int) -> dict:
    args = [
        sys.executable,
        "-m",
        "rlkit",
        "recipe=pair_sum",
        f"model.base_model={path}",
        "warmup.steps=0",
        f"adapter.rank={RANK}",
        f"adapter.alpha={ALPHA}",
        "adapter.train_unembed=false",
        f"optim.lr={LR}",
        "optim.schedule=constant",
        "reward=[]",
        "+reward.digits._target_=bench_vs_trl.digit_fraction",
        "stop=[]",
        f"steps={steps + 1}",
        f"groups_per_step={GROUPS}",
        f"group_size={GROUP_SIZE}",
        f"max_tokens={MAX_TOKENS}",
        "eval_every=100000",
        "env.eval_size=1",
        "samples_every=100000",
        "checkpoint.every=0",
        f"hydra.run.dir={run_dir}",
    ]
    env = {**os.environ, "PYTHONPATH": str(HERE), "OMP_NUM_THREADS": str(threads)}
    wrapper = (
        "import runpy, sys, resource, json\n"
        "sys.argv = ['rlkit'] + sys.argv[1:]\n"
        "try:\n    runpy.run_module('rlkit', run_name='__main__')\n"
        "finally:\n"
        "    print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", wrapper, *args[3:]], env=env, capture_output=True, text=True
    )
    if out.returncode != 0:
        raise SystemExit(f"rlkit segment failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    peak = int(next(line.split()[1] for line in out.stdout.splitlines() if line.startswith("PEAK")))
    timings = [json.loads(line) for line in (run_dir / "timings.jsonl").read_text().splitlines()]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps_m = [m for m in metrics if m.get("step", -1) >= 1 and "reward/mean" in m]
    steps_t = [t for t in timings if t.get("step", -1) >= 1 and "time/step" in t]
    return {
        "step_s": [t["time/step"] for t in steps_t],
        "phases": {k: [t[k] for t in steps_t] for k in steps_t[0] if k.startswith("time/")},
        "tokens": [m["train/completion_tokens"] * GROUPS * GROUP_SIZE for m in steps_m],
        "reward": [m["reward/mean"] for m in steps_m],
        "peak": peak,
    }


# ---- TRL (runs in TRL's own environment) ----------------------------------------------------
def trl_segment(path: str, steps: int, prompts_file: str, threads: int) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(threads)
    prompts = json.loads(Path(prompts_file).read_text())
    data = Dataset.from_list([{"prompt": p} for p in prompts[: GROUPS * (steps + 1)]])
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    rewards, tokens, times = [], [], []

    def reward(completions, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        values = digit_fraction(texts)
        rewards.append(sum(values) / len(values))
        return values

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:  # generated tokens, per completion
                tokens.append(float(logs["completions/mean_length"]) * GROUPS * GROUP_SIZE)

    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-"),
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=GROUPS * GROUP_SIZE,
        gradient_accumulation_steps=1,
        num_generations=GROUP_SIZE,
        max_completion_length=MAX_TOKENS,
        temperature=1.0,
        beta=0.0,
        learning_rate=LR,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        max_steps=steps + 1,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
        dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=config,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear"),
        callbacks=[Clock()],
    )
    trainer.train()
    return {
        "step_s": times[1:],
        "tokens": tokens[1:],
        "reward": rewards[1:],
        "peak": peak_rss(),
    }


# ---- the step profile ---------------------------------------------------------------------
def matmul_peak(threads: int, n: int = 2048, reps: int = 10) -> float:
    """This machine's float32 matmul rate (FLOP/s) with `threads` threads: the compute limit."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t)


def matmul_params(path: str) -> tuple[int, int]:
    """Parameters a token's forward pass multiplies by (all but the input embedding), and those
    of the adapter (rank RANK on every linear layer but the output one)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    embed = model.get_input_embeddings().weight.numel()
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    adapter = sum(
        RANK * (m.in_features + m.out_features)
        for m in model.modules()
        if isinstance(m, torch.nn.Linear) and m is not head
    )
    return sum(p.numel() for p in model.parameters()) - (0 if tied else embed), adapter


def executed_tokens(prompts: list[list[int]], completion: int) -> tuple[int, int]:
    """Tokens rlkit's passes actually run for one step of these prompts, padding included:
    sampling (each prompt's prefill once, then every row's decoded tokens) and training (the
    learner's microbatches with their shared prefixes, planned as the learner plans them, on
    rows of `completion` random tokens after their prompt)."""
    import random

    import torch

    from rlkit.backend import prefixes
    from rlkit.backend.batching import TokenRow, microbatches

    sample = len(prompts) * max(map(len, prompts)) + len(prompts) * GROUP_SIZE * completion
    rng = random.Random(0)
    rows = []
    for prompt in prompts:
        for _ in range(GROUP_SIZE):
            t = torch.tensor(prompt + [rng.randrange(3, 259) for _ in range(completion)])[:-1]
            rows.append(TokenRow(t, t, {}))
    train = 0
    for group in microbatches(rows, 8192):  # the learner's default tokens_per_microbatch
        seqs = [rows[i] for i in group]
        plan = prefixes.plan(seqs)
        lengths = [s.length for s in seqs]
        train += plan.tokens_run(lengths) if plan else len(seqs) * max(lengths)
    return sample, train


def print_profile(profiles, threads: int, prompts_file: Path) -> None:
    """rlkit's phases per step and their achieved FLOP/s against the matmul peak, measured now.

    Two rates per phase. "rows' work": the FLOPs of running every row in full, as TRL does
    (sampling 2 N per prompt and generated token of every completion, from merged weights;
    training 4 N + 6 A per token: the base's forward and backward pass to the activations, the
    frozen base needs no weight gradients, and the adapter's forward, backward and weight
    gradients), divided by the phase's time. "executed": the FLOPs of the tokens rlkit's passes
    actually run (a prompt's prefill once per group, shared prefixes in training, padding
    included); that one, against the peak, says how well the machine is used. N = the model's
    matmul parameters, A = the adapter's; attention is left out of both (3-4% of a token's
    FLOPs at these lengths), so the fractions are slight underestimates."""
    from rlkit.backend import models

    peak = matmul_peak(threads)
    chats = json.loads(prompts_file.read_text())
    print(f"\nmatmul peak now: {peak / 1e9:.0f} GFLOP/s ({threads} threads, 2048x2048 float32)\n")
    print("| model | phase | s/step (median) | GFLOP/s, rows' work | GFLOP/s, executed | of peak |")
    print("|---|---|---|---|---|---|")
    for size, path, segs in profiles:
        tokenizer = models.load_tokenizer(path)  # each model's own chat template and vocabulary
        prompts = [
            tokenizer.apply_chat_template(p, add_generation_prompt=True, return_dict=False)
            for p in chats
        ]
        prompt_tokens = statistics.mean(map(len, prompts))
        n, adapter = matmul_params(path)
        rows = GROUPS * GROUP_SIZE
        completion = statistics.mean(t for seg in segs for t in seg["tokens"]) / rows
        sample_run, train_run = executed_tokens(prompts[:GROUPS], round(completion))
        work = {
            "time/sample": (rows * (prompt_tokens + completion), sample_run, 2 * n),
            "time/train": (rows * (prompt_tokens + completion), train_run, 4 * n + 6 * adapter),
        }
        for phase in segs[0]["phases"]:
            seconds = statistics.median(v for seg in segs for v in seg["phases"][phase])
            cells = " | | "
            if phase in work:
                full, executed, per_token = work[phase]
                rate = per_token * executed / seconds
                cells = (
                    f"{per_token * full / seconds / 1e9:.1f} | {rate / 1e9:.1f} | {rate / peak:.0%}"
                )
            print(f"| {size} ({n / 1e6:.1f}M) | {phase[5:]} | {seconds:.2f} | {cells} |")


# ---- the comparison --------------------------------------------------------------------------
def summary(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="small,25m")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per segment")
    parser.add_argument("--repeats", type=int, default=2, help="A B pairs per size")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--trl-python", default="/tmp/trl-venv/bin/python")
    parser.add_argument("--trl-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_child:
        path, prompts_file, steps = args.trl_child
        print("RESULT", json.dumps(trl_segment(path, int(steps), prompts_file, args.threads)))
        return

    work = Path(tempfile.mkdtemp(prefix="bench-vs-trl-"))
    prompts_file = work / "prompts.json"
    write_prompts(prompts_file, args.steps + 1)
    print(
        f"{GROUPS} prompts x {GROUP_SIZE} completions x <= {MAX_TOKENS} tokens, LoRA rank {RANK}, "
        f"float32, {args.threads} threads, {args.steps} timed steps per segment (after 1 warm-up), "
        f"{args.repeats} x (rlkit, TRL) per size\n"
    )
    print(
        "| model | framework | s/step median (min-max) | completion tokens/step | peak RSS (GiB) "
        "| reward first -> last | rlkit / TRL |"
    )
    print("|---|---|---|---|---|---|---|")
    profiles = []
    for size in args.sizes.split(","):
        path = model_path(size)
        results: dict[str, list[dict]] = {"rlkit": [], "TRL": []}
        for r in range(args.repeats):
            results["rlkit"].append(
                rlkit_segment(path, args.steps, work / f"{size}-{r}", args.threads)
            )
            out = subprocess.run(
                [args.trl_python, __file__, "--threads", str(args.threads), "--trl-child", path,
                 str(prompts_file), str(args.steps)],
                capture_output=True, text=True,
            )  # fmt: skip
            if out.returncode != 0:
                raise SystemExit(f"TRL segment failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
            line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT"))
            results["TRL"].append(json.loads(line.split(" ", 1)[1]))
        medians = {}
        for name, segs in results.items():
            step_s = [s for seg in segs for s in seg["step_s"]]
            medians[name] = statistics.median(step_s)
            tokens = statistics.mean(t for seg in segs for t in seg["tokens"])
            first = statistics.mean(seg["reward"][0] for seg in segs)
            last = statistics.mean(seg["reward"][-1] for seg in segs)
            peak = max(seg["peak"] for seg in segs) / 2**30
            ratio = f"{medians['rlkit'] / medians['TRL']:.2f}" if name == "TRL" else ""
            print(
                f"| {size} | {name} | {summary(step_s)} | {tokens:.0f} | {peak:.2f} | "
                f"{first:.3f} -> {last:.3f} | {ratio} |",
                flush=True,
            )
        profiles.append((size, path, results["rlkit"]))
    print_profile(profiles, args.threads, prompts_file)


if __name__ == "__main__":
    main()
