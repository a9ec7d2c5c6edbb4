"""`simpo-lite eval`: preference metrics of a model on a dataset, under the names training logs (eval_...)."""

from __future__ import annotations

from pathlib import Path

from simpo_lite.errors import UserError


def evaluate_command(model_or_run: str, preset: str | None = None, config=None, data: str | None = None,
                     sets: list[str] | None = None, out=None) -> dict:
    """Metrics of a base model, a run's adapter or an exported model on an eval split."""
    from simpo_lite.console import info
    from simpo_lite.files import check_output_path, write_json
    from simpo_lite.target import load_target_model, load_target_tokenizer, model_device, resolve_target

    if out is not None and Path(out).suffix.lower() != ".json":
        raise UserError(f"--out '{out}' must end in .json")
    if out is not None:
        check_output_path(out)  # the metrics are written last: a bad path must not waste the eval
    target = resolve_target(model_or_run, preset=preset, config=config, data=data, sets=sets)
    from simpo_lite.data import build_datasets, make_collator  # torch and datasets: after the cheap checks
    from simpo_lite.policy import ConcatenatedPolicy, evaluate_dataset

    cfg = target.cfg
    tokenizer = load_target_tokenizer(target)
    # The same seed, split and hold-out as training, so a run is scored on the pairs it was evaluated on.
    prepared = build_datasets(cfg.data, tokenizer, cfg.train.seed)
    if prepared.eval is None or len(prepared.eval) == 0:
        raise UserError(f"data '{cfg.data.source}' has no eval pairs: give --set data.eval_split=NAME, "
                        f"--set data.eval_source=FILE or --set data.eval_fraction=0.1")
    model = load_target_model(target)
    policy = ConcatenatedPolicy.from_config(model, cfg.simpo)
    collate = make_collator(tokenizer.pad_token_id, cfg.simpo.pack_prompt, cfg.simpo.pack_tokens)
    metrics = evaluate_dataset(policy, prepared.eval, collate, cfg.simpo, cfg.train.eval_batch_size,
                               device=model_device(model))
    result = {"model_or_run": model_or_run, "model": target.describe(), "data": cfg.data.source,
              "eval_pairs": len(prepared.eval), "eval_origin": prepared.report.eval_origin, "beta": cfg.simpo.beta, "gamma_beta_ratio": cfg.simpo.gamma_beta_ratio,
              **metrics}
    # A file given with --data is a training source to the config: say when only its held-out share counts.
    _print_metrics(result, whole_hint=data is not None and cfg.data.eval_fraction < 1
                   and not (cfg.data.eval_source or cfg.data.eval_split))
    run = Path(model_or_run) if target.kind == "run" else Path(model_or_run).parent
    if target.kind in ("run", "checkpoint") and (run / "samples.jsonl").is_file():
        info(f"these figures are not the outcome; what the model writes: simpo-lite report {run}")
    if out is not None:
        write_json(Path(out), result)
        info(f"wrote {out}")
    return result


def _print_metrics(result: dict, whole_hint: bool = False) -> None:
    from simpo_lite.console import info, print_table

    pairs = result["eval_pairs"]
    hint = "; --set data.eval_fraction=1 scores every pair" if whole_hint else ""
    info(f"{result['model']}; {pairs} eval pair{'' if pairs == 1 else 's'} of {result['data']} "
         f"({result['eval_origin']}{hint}), beta {result['beta']:g}, gamma/beta {result['gamma_beta_ratio']:g}")
    print_table(["metric", "value"], [[key, f"{value:.4f}" if isinstance(value, float) else str(value)]
                                    for key, value in result.items()
                                    if key.startswith("eval_") and key not in ("eval_pairs", "eval_origin")])
