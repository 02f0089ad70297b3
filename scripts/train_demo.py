"""Train grok_moe's bundled demo model: a small Grok-architecture MoE on Shakespeare.

    python scripts/train_demo.py              # ~40 minutes on 2 CPU cores
    python scripts/train_demo.py --help       # every setting

Needs the corpus split by ``scripts/demo_data.py`` (``.cache/demo_data/{train,val}.txt``;
that script fetches and prepares it) and its committed tokenizer
(``checkpoints/demo/tokenizer.model``), and optax (``pip install -e ".[train]"``).

The model follows every rule of GROK1_SPEC.md, at a small size: 8 experts with
2 per token, grouped-query attention with RoPE and the soft logit cap, four
RMSNorms per layer, tied embeddings, and Grok-1's multipliers as formulas of
its sizes (embeddings times sqrt(D), attention scores times key_size**-0.5,
logits times 3**-0.5).

Steps:

1. **Data.** Both splits are tokenized whole (no BOS/EOS, no padding). Each
   training step reads ``--batch-size`` windows of ``--seq-len`` + 1 tokens at
   random places in the training split.
2. **Objective.** Mean next-token cross-entropy plus ``--aux-weight`` times a
   Switch-style load-balancing loss per layer, ``E * sum_e f_e * P_e``: f_e is
   expert e's fraction of the routed (token, expert) assignments, P_e the mean
   gate it was given (0 where not chosen), both over the batch. Only P carries a
   gradient; it pushes the router away from the experts that get more than their
   share.
3. **Optimizer.** AdamW (b2 0.99, decoupled weight decay on matrices only) after
   global-norm gradient clipping, float32 throughout. The learning rate warms
   up linearly, then follows a cosine to ``--min-lr-ratio`` of its peak. The
   schedule runs on *progress*, the larger of elapsed time / ``--minutes`` and
   step / ``--max-steps``, so it ends at its minimum when training stops,
   whichever limit comes first.
4. **Gradients.** ``jax.value_and_grad`` of the objective through grok_moe's
   forward pass. The MoE's backward pass is ``moe.sparse_moe``'s own custom
   VJP, which skips unused experts and tiles as the forward pass does (JAX
   cannot reverse-differentiate the forward pass's loops, whose trip counts
   are traced; ``python -m benchmarks.moe_grad`` times it against the dense
   MoE's gradient).
5. **Evaluation.** Every ``--eval-every`` steps: the mean training loss since
   the last report and the loss on ``--eval-windows`` windows spread evenly
   over the validation split, next to the unigram baseline. At the end, the
   whole validation split (see ``scripts/demo_eval.py`` for how a stream is
   scored).
6. **Outputs.** The float parameters go to ``<work-dir>/float_params.npz``; the
   int8 checkpoint (``ckpt-0/`` in the release format, and ``config.json``)
   to ``--out``, leaving the tokenizer, validation sample and unigram counts
   there as they are; then ``<out>/training_report.json`` with the config,
   parameter counts, steps, time, the loss curve, the final losses of the float
   and int8 models, the unigram baselines and each layer's expert shares.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import math
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if not __package__:  # run as `python scripts/train_demo.py`: make `scripts` importable
    sys.path.insert(0, str(REPO_ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import grok_moe  # noqa: E402
from grok_moe import manifest  # noqa: E402
from grok_moe.config import ModelConfig  # noqa: E402
from scripts import demo_data, demo_eval  # noqa: E402

DEFAULT_DATA_DIR = demo_data.DEFAULT_CACHE_DIR
DEFAULT_OUT_DIR = demo_data.DEFAULT_DEMO_DIR
DEFAULT_WORK_DIR = REPO_ROOT / ".cache" / "demo_train"
REPORT_FILE = "training_report.json"
FLOAT_PARAMS_FILE = "float_params.npz"


# --------------------------------------------------------------------------- model


def demo_config(args: argparse.Namespace, tokenizer_size: int) -> ModelConfig:
    """The model config from the flags, with Grok-1's multipliers for its sizes."""
    return ModelConfig(
        vocab_size=args.vocab_size or tokenizer_size,
        emb_size=args.emb_size,
        key_size=args.key_size,
        num_q_heads=args.num_q_heads,
        num_kv_heads=args.num_kv_heads,
        num_layers=args.num_layers,
        num_experts=args.num_experts,
        num_selected_experts=args.num_selected_experts,
        widening_factor=args.widening_factor,
        sequence_len=args.seq_len,
        embedding_multiplier_scale=math.sqrt(args.emb_size),
        attn_output_multiplier=args.key_size ** -0.5,
        output_multiplier_scale=3 ** -0.5,
    )


def parameter_counts(config: ModelConfig) -> dict[str, int]:
    """Total parameters, and those one token uses (its k experts, not all E)."""
    total = sum(math.prod(shape) for shape in manifest.parameter_shapes(config).values())
    per_expert = 3 * config.emb_size * config.ffn_size
    unused = (config.num_experts - config.num_selected_experts) * per_expert * config.num_layers
    return {"total": total, "active_per_token": total - unused,
            "experts": config.num_experts * per_expert * config.num_layers}


# --------------------------------------------------------------------------- objective


def load_balance_loss(expert_indices: jax.Array, gates: jax.Array, num_experts: int) -> jax.Array:
    """Mean over layers of E * sum_e f_e * P_e (see the module docstring).

    expert_indices, gates [L, B, T, k] -> scalar.
    """
    chosen = jax.nn.one_hot(expert_indices, num_experts, dtype=jnp.float32)  # [L, B, T, k, E]
    fraction = jnp.mean(chosen, axis=(1, 2, 3))                                # [L, E] f_e
    mean_gate = jnp.mean(jnp.sum(chosen * gates[..., None], axis=3), axis=(1, 2))  # [L, E] P_e
    return num_experts * jnp.mean(jnp.sum(fraction * mean_gate, axis=-1))


def learning_rate(progress: float, peak: float, warmup: float, min_ratio: float) -> float:
    """Linear warmup over the first `warmup` of progress, then cosine to min_ratio * peak."""
    if progress < warmup:
        return peak * progress / warmup
    decay = min(1.0, (progress - warmup) / (1.0 - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * decay)))


def make_train_step(config: ModelConfig, optimizer, aux_weight: float, tile_size: int):
    """A jitted step (params, opt_state, windows [B, T+1], lr) -> (params, opt_state, metrics).

    The optimizer runs at learning rate 1; its updates are scaled by `lr`, which
    for AdamW with decoupled weight decay is the same as running it at `lr`.
    """
    def loss_fn(params, windows):
        inputs, targets = windows[:, :-1], windows[:, 1:]                       # [B, T]
        out = grok_moe.forward(params, inputs, config, dtype=jnp.float32,
                               return_routing=True, tile_size=tile_size)
        log_probs = jax.nn.log_softmax(out.logits, axis=-1)                      # [B, T, V]
        cross_entropy = -jnp.mean(jnp.take_along_axis(log_probs, targets[..., None], axis=-1))
        balance = load_balance_loss(out.routing.expert_indices, out.routing.gates,
                                    config.num_experts)
        return cross_entropy + aux_weight * balance, (cross_entropy, balance)

    @jax.jit
    def step(params, opt_state, windows, lr):
        (loss, (cross_entropy, balance)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, windows)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        updates = jax.tree.map(lambda update: lr * update, updates)
        params = jax.tree.map(jnp.add, params, updates)
        metrics = {"loss": loss, "cross_entropy": cross_entropy, "balance": balance,
                   "grad_norm": _global_norm(grads)}
        return params, opt_state, metrics

    return step


def _global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree.leaves(tree)))


def make_optimizer(weight_decay: float, clip: float):
    """Clipping then AdamW at learning rate 1, decaying only matrices (ndim >= 2)."""
    import optax  # the optional "train" extra
    decay_mask = lambda params: jax.tree.map(lambda leaf: leaf.ndim >= 2, params)  # noqa: E731
    return optax.chain(
        optax.clip_by_global_norm(clip),
        optax.adamw(learning_rate=1.0, b1=0.9, b2=0.99, weight_decay=weight_decay,
                    mask=decay_mask),
    )


# --------------------------------------------------------------------------- data


def random_windows(rng: np.random.Generator, ids: np.ndarray, batch_size: int,
                   length: int) -> np.ndarray:
    """[batch_size, length] windows of `ids` starting at uniformly random positions."""
    starts = rng.integers(0, len(ids) - length + 1, size=batch_size)
    return ids[starts[:, None] + np.arange(length)]


def evenly_spaced_windows(ids: np.ndarray, config: ModelConfig,
                          count: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` of the stream's scoring windows (inputs, targets), spread evenly over it."""
    inputs, targets = demo_eval.stream_windows(ids, config.sequence_len, config.pad_token)
    keep = np.linspace(0, len(inputs) - 1, num=min(count, len(inputs))).astype(int)
    return inputs[keep], targets[keep]


def load_splits(data_dir: Path, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of train.txt and val.txt in `data_dir`."""
    splits = []
    for name in ("train.txt", "val.txt"):
        path = data_dir / name
        if not path.is_file():
            raise SystemExit(f"{path} is missing: run `python scripts/demo_data.py` first "
                             "(it fetches and splits the corpus)")
        splits.append(demo_data.encode(tokenizer, path.read_text(encoding="utf-8")))
    return splits[0], splits[1]


# --------------------------------------------------------------------------- training


@dataclasses.dataclass
class TrainResult:
    params: dict
    steps: int
    tokens: int
    train_seconds: float
    history: list[dict]


def train(args: argparse.Namespace, config: ModelConfig, train_ids: np.ndarray,
          val_ids: np.ndarray, unigram_val: float) -> TrainResult:
    """Train from a fresh init until --minutes or --max-steps; report every --eval-every steps."""
    params = grok_moe.init_params(config, seed=args.seed)
    optimizer = make_optimizer(args.weight_decay, args.clip)
    opt_state = optimizer.init(params)
    step_fn = make_train_step(config, optimizer, args.aux_weight, args.train_tile_size)
    val_inputs, val_targets = evenly_spaced_windows(val_ids, config, args.eval_windows)
    rng = np.random.default_rng(args.seed)
    budget_s = args.minutes * 60
    history, window_metrics = [], []
    start = time.perf_counter()
    step = tokens = 0

    def progress() -> float:
        by_time = (time.perf_counter() - start) / budget_s
        by_steps = step / args.max_steps if args.max_steps else 0.0
        return max(by_time, by_steps)

    def report() -> None:
        elapsed = time.perf_counter() - start
        val = demo_eval.score_windows(params, config, val_inputs, val_targets,
                                     batch_size=len(val_inputs)).nats_per_token
        means = {key: float(np.mean([m[key] for m in window_metrics])) for key in window_metrics[0]}
        entry = {"step": step, "minutes": round(elapsed / 60, 2), "tokens": tokens,
                 "lr": lr, "train_loss": means["cross_entropy"], "balance": means["balance"],
                 "grad_norm": means["grad_norm"], "val_loss_subset": val}
        history.append(entry)
        print(f"step {step:5d} | {elapsed / 60:5.1f} min | {tokens / 1e6:5.2f}M tokens | "
              f"lr {lr:.2e} | train {entry['train_loss']:.4f} | val {val:.4f} | "
              f"unigram {unigram_val:.4f} | balance {entry['balance']:.3f} | "
              f"|g| {entry['grad_norm']:.2f} | {tokens / elapsed:.0f} tok/s", flush=True)
        window_metrics.clear()

    lr = 0.0
    while progress() < 1.0:
        lr = learning_rate(progress(), args.lr, args.warmup, args.min_lr_ratio)
        windows = random_windows(rng, train_ids, args.batch_size, config.sequence_len + 1)
        params, opt_state, metrics = step_fn(params, opt_state, windows, lr)
        window_metrics.append({key: float(value) for key, value in metrics.items()})
        step += 1
        tokens += windows.size - len(windows)
        if step == 1:
            print(f"first step (with compilation) took {time.perf_counter() - start:.1f} s",
                  flush=True)
        if step % args.eval_every == 0:
            report()
    if window_metrics:
        report()
    return TrainResult(params, step, tokens, time.perf_counter() - start, history)


# --------------------------------------------------------------------------- outputs


def save_float_params(params, path: Path) -> None:
    """The float32 parameters as an .npz of {name: array} (the stacked tree's names)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{name: np.asarray(leaf) for name, leaf in manifest.flatten(params).items()})


def shares_document(score: demo_eval.StreamScore) -> dict:
    """Per-layer expert shares of the routed assignments, with their extremes."""
    shares = score.expert_shares
    return {"per_layer": [[round(float(share), 5) for share in layer] for layer in shares],
            "min": float(shares.min()), "max": float(shares.max())}


def final_report(args, config, result: TrainResult, out_dir: Path, tokenizer_bytes: bytes,
                 train_ids, val_ids, sample_ids, train_counts) -> dict:
    """Evaluate the float and int8 models and build the training report."""
    started = time.perf_counter()
    print("evaluating the float model on the whole validation split ...", flush=True)
    float_val = demo_eval.score_stream(result.params, config, val_ids)
    float_sample = demo_eval.score_stream(result.params, config, sample_ids)
    print(f"writing the int8 checkpoint to {out_dir} ...", flush=True)
    grok_moe.save_checkpoint(result.params, out_dir, config, overwrite=True, progress=False)
    int8_params = grok_moe.load_checkpoint(out_dir, progress=False)
    int8_sample = demo_eval.score_stream(int8_params, config, sample_ids)
    baseline_val = demo_data.unigram_cross_entropy(train_counts, val_ids)
    baseline_sample = demo_data.unigram_cross_entropy(train_counts, sample_ids)
    print(f"evaluated and saved in {time.perf_counter() - started:.0f} s", flush=True)
    return {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python scripts/train_demo.py " + " ".join(sys.argv[1:]),
        "settings": {key: _display_path(value) if isinstance(value, Path) else value
                     for key, value in vars(args).items()},
        "config": config.to_dict(),
        "parameters": parameter_counts(config),
        "tokenizer_sha256": hashlib.sha256(tokenizer_bytes).hexdigest(),
        "data": {"train_tokens": int(len(train_ids)), "val_tokens": int(len(val_ids)),
                 "val_sample_tokens": int(len(sample_ids))},
        "training": {"steps": result.steps, "tokens_seen": result.tokens,
                     "epochs": result.tokens / len(train_ids),
                     "wall_minutes": result.train_seconds / 60,
                     "tokens_per_second": result.tokens / result.train_seconds,
                     "final_train_loss": result.history[-1]["train_loss"],
                     "history": result.history},
        "loss_nats_per_token": {
            "val_float": float_val.nats_per_token,
            "val_sample_float": float_sample.nats_per_token,
            "val_sample_int8": int8_sample.nats_per_token,
            "int8_vs_float_on_val_sample": int8_sample.nats_per_token / float_sample.nats_per_token - 1,
        },
        "unigram_baseline_nats_per_token": {"val": baseline_val, "val_sample": baseline_sample},
        "below_baseline": {"val_float": 1 - float_val.nats_per_token / baseline_val,
                           "val_sample_int8": 1 - int8_sample.nats_per_token / baseline_sample},
        "expert_shares_val_sample": {"int8": shares_document(int8_sample),
                                     "float": shares_document(float_sample)},
    }


def _display_path(path: Path) -> str:
    """`path` relative to the repository when it lies inside it, so reports name no machine."""
    path = path.resolve()
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def directory_bytes(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


# --------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line (``sys.argv[1:]`` when ``argv`` is None)."""
    parser = argparse.ArgumentParser(
        description="Train the bundled demo model (a small Grok-architecture MoE) on the "
                    "Shakespeare split of scripts/demo_data.py and write its int8 checkpoint, "
                    "config and training report. Needs optax.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    model = parser.add_argument_group("model (Grok-1's multipliers follow from the sizes)")
    model.add_argument("--emb-size", type=int, default=128, help="model width D")
    model.add_argument("--num-layers", type=int, default=6, help="decoder layers")
    model.add_argument("--num-q-heads", type=int, default=4, help="query heads")
    model.add_argument("--num-kv-heads", type=int, default=2,
                       help="key/value heads (grouped-query attention)")
    model.add_argument("--key-size", type=int, default=32, help="width of one head")
    model.add_argument("--num-experts", type=int, default=8, help="experts per layer")
    model.add_argument("--num-selected-experts", type=int, default=2, help="experts per token")
    model.add_argument("--widening-factor", type=float, default=3.0,
                       help="expert hidden size is int(widening * D) * 2 // 3, rounded up to 8")
    model.add_argument("--seq-len", type=int, default=256,
                       help="context length: training windows and the config's sequence_len")
    model.add_argument("--vocab-size", type=int, default=0,
                       help="embedding rows; 0 takes the tokenizer's size")

    training = parser.add_argument_group("training")
    training.add_argument("--minutes", type=float, default=38.0,
                          help="wall-clock budget of the training loop (evaluation and "
                               "saving take about two more minutes)")
    training.add_argument("--max-steps", type=int, default=0,
                          help="stop after this many steps as well; 0 for no step limit")
    training.add_argument("--batch-size", type=int, default=16, help="windows per step")
    training.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    training.add_argument("--warmup", type=float, default=0.03,
                          help="fraction of the run spent warming the learning rate up")
    training.add_argument("--min-lr-ratio", type=float, default=0.1,
                          help="final learning rate as a fraction of the peak")
    training.add_argument("--weight-decay", type=float, default=0.1,
                          help="AdamW decoupled weight decay, on matrices only")
    training.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip")
    training.add_argument("--aux-weight", type=float, default=0.01,
                          help="weight of the load-balancing loss")
    training.add_argument("--train-tile-size", type=int, default=256,
                          help="MoE tile rows in training steps (about a quarter of the rows "
                               "an expert gets per batch keeps padding and loop overhead low)")
    training.add_argument("--seed", type=int, default=0, help="initialisation and data order")

    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--eval-every", type=int, default=50,
                            help="report train and validation loss every this many steps")
    evaluation.add_argument("--eval-windows", type=int, default=64,
                            help="validation windows scored at each report (spread over the "
                                 "split); the whole split is scored at the end")

    paths = parser.add_argument_group("paths")
    paths.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                       help="holds train.txt and val.txt from scripts/demo_data.py")
    paths.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR,
                       help="holds tokenizer.model, val_sample.txt and unigram_counts.json; "
                            "ckpt-0/, config.json and training_report.json are written here")
    paths.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR,
                       help=f"where {FLOAT_PARAMS_FILE} is written")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Train, save the float params and the int8 checkpoint, and write the report."""
    args = parse_args(argv)
    tokenizer_bytes = (args.out / "tokenizer.model").read_bytes()
    tokenizer = demo_data.load_tokenizer(tokenizer_bytes)
    config = demo_config(args, tokenizer.get_piece_size())
    counts = parameter_counts(config)
    print(f"config: {config.to_dict()}")
    print(f"parameters: {counts['total']:,} total, {counts['active_per_token']:,} active per "
          f"token; jax {jax.__version__} on {jax.default_backend()}", flush=True)

    train_ids, val_ids = load_splits(args.data_dir, tokenizer)
    sample_ids = demo_eval.encode_file(args.out / "tokenizer.model", args.out / "val_sample.txt")
    train_counts = demo_eval.read_train_counts(args.out / "unigram_counts.json")
    unigram_val = demo_data.unigram_cross_entropy(train_counts, val_ids)
    print(f"tokens: train {len(train_ids):,}, val {len(val_ids):,}, val sample "
          f"{len(sample_ids):,}; unigram baseline on val {unigram_val:.4f} nats/token, "
          f"bar {demo_data.REQUIRED_LOSS_RATIO * unigram_val:.4f}", flush=True)

    result = train(args, config, train_ids, val_ids, unigram_val)
    print(f"trained {result.steps} steps, {result.tokens / 1e6:.2f}M tokens in "
          f"{result.train_seconds / 60:.1f} min", flush=True)
    save_float_params(result.params, args.work_dir / FLOAT_PARAMS_FILE)

    report = final_report(args, config, result, args.out, tokenizer_bytes, train_ids, val_ids,
                          sample_ids, train_counts)
    (args.out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    losses, baselines = report["loss_nats_per_token"], report["unigram_baseline_nats_per_token"]
    shares = report["expert_shares_val_sample"]["int8"]
    print(f"val split: float {losses['val_float']:.4f} nats/token vs unigram "
          f"{baselines['val']:.4f} ({report['below_baseline']['val_float']:.1%} below)")
    print(f"val sample: float {losses['val_sample_float']:.4f}, int8 "
          f"{losses['val_sample_int8']:.4f} ({losses['int8_vs_float_on_val_sample']:+.2%}), "
          f"unigram {baselines['val_sample']:.4f}; expert shares {shares['min']:.3f}.."
          f"{shares['max']:.3f}")
    print(f"{args.out}: {directory_bytes(args.out) / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
