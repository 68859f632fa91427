"""Config: YAML + dotted overrides + short flags resolve as documented; invalid values name the field."""

from __future__ import annotations

import pytest
import yaml

from rank1.core.config import PAPER_TARGET_MODULES, Config, ConfigError
from rank1.core.flags import from_dict, load_config, to_dict, to_yaml


def test_defaults_are_the_papers_adapter():
    cfg = load_config([])
    assert (cfg.adapter.r, cfg.adapter.alpha, cfg.adapter.use_rslora, cfg.adapter.dropout) == (1, 16.0, True, 0.0)
    assert cfg.adapter.target_modules == PAPER_TARGET_MODULES
    assert (cfg.trainer.betas, cfg.trainer.weight_decay, cfg.trainer.warmup_ratio) == ([0.9, 0.95], 1e-4, 0.05)
    assert cfg.trainer.objective == "sft" and cfg.model.trust_remote_code is False


def test_yaml_then_flags_in_order(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("trainer:\n  lr: 0.01\n  max_steps: 7\n  zero_stage: 3\nmodel:\n  name_or_path: some/model\nseed: 5\n")
    cfg = load_config(["--config", str(f), "--trainer.lr", "2e-3", "--max-steps=9", "--output-dir", "out/x",
                       "--data", "d.jsonl", "--seed", "11", "--adapter.target_modules", "q_proj,v_proj", "--resume"])
    assert cfg.trainer.lr == 2e-3  # flag beats file
    assert cfg.trainer.max_steps == 9
    assert cfg.trainer.zero_stage == "3"  # YAML int for a string choice field
    assert cfg.model.name_or_path == "some/model"  # file value kept
    assert cfg.logging.output_dir == "out/x" and cfg.data.path == "d.jsonl" and cfg.seed == 11
    assert cfg.adapter.target_modules == ["q_proj", "v_proj"] and cfg.trainer.resume is True


def test_short_flags_map_to_fields():
    cfg = load_config(["--objective", "sft", "--model", "m", "--data", "d", "--max-steps", "3", "--output-dir", "o", "--seed", "4"])
    assert (cfg.trainer.objective, cfg.model.name_or_path, cfg.data.path, cfg.trainer.max_steps, cfg.logging.output_dir, cfg.seed) == (
        "sft", "m", "d", 3, "o", 4)


def test_yaml_round_trip():
    cfg = load_config(["--trainer.lr", "0.5", "--output-dir", "o"])
    again = from_dict(yaml.safe_load(to_yaml(cfg)))
    assert to_dict(again) == to_dict(cfg)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--trainer.lrr", "1"], "unknown config key 'trainer.lrr'"),
        (["--nope", "1"], "unknown config key 'nope'"),
        (["--trainer", "1"], "'trainer' is a section"),
        (["--trainer.lr", "fast"], "--trainer.lr: trainer.lr: expected a number"),
        (["--max-steps", "2.5"], "--max-steps: trainer.max_steps: expected an integer"),
        (["--trainer.resume", "maybe"], "expected true or false"),
        (["--objective", "ppo"], "trainer.objective: 'ppo' is not one of sft, grpo"),
        (["--trainer.zero_stage", "4"], "trainer.zero_stage: '4' is not one of auto, 0, 1, 2, 3"),
        (["--data.overlong", "cut"], "data.overlong: 'cut' is not one of truncate, drop"),
        (["--trainer.lr", "-1"], "trainer.lr: must be > 0"),
        (["--trainer.warmup_ratio", "1.5"], "trainer.warmup_ratio"),
        (["--trainer.global_batch_size", "6", "--trainer.micro_batch_size", "4"], "not a multiple"),
        (["--trainer.betas", "0.9"], "trainer.betas"),
        (["--adapter.r", "0"], "adapter.r: must be > 0"),
        (["--trainer.lr"], "flag --trainer.lr needs a value"),
        (["stray"], "unexpected argument 'stray'"),
        (["--objective", "grpo", "--grpo.num_generations", "1"], "grpo.num_generations: must be >= 2"),
        (["--objective", "grpo", "--grpo.prompts_per_step", "3", "--trainer.micro_batch_size", "8"],
         "grpo.prompts_per_step × grpo.num_generations: 12 is not a multiple"),
        (["--grpo.aggregation", "mean"], "grpo.aggregation: 'mean' is not one of token, sequence, constant"),
        (["--grpo.scale_rewards", "std"], "grpo.scale_rewards: 'std' is not one of group, batch, none"),
        (["--objective", "grpo", "--grpo.max_completion_length", "4096", "--rollout.max_model_len", "2048"],
         "grpo.max_completion_length: 4096 leaves no room for a prompt"),
        (["--logging.report_to", "mlflow"], "logging.report_to: 'mlflow' is not one of tensorboard, wandb"),
    ],
)
def test_invalid_values_name_the_field(argv, message):
    # What `rank1 train` checks before any work: the tree (types, ranges), then the objective's own rules.
    from rank1.driver.run import make_objective

    with pytest.raises(ConfigError) as e:
        make_objective(load_config(argv))
    assert message in str(e.value)


def test_rollout_async_is_a_key_of_its_own():
    # `async` is a Python keyword, so the field is async_generation; users type the short key.
    assert load_config(["--rollout.async", "true"]).rollout.async_generation is True
    assert load_config(["--rollout.async_generation", "true"]).rollout.async_generation is True


def test_yaml_errors_name_the_file(tmp_path):
    bad_key = tmp_path / "bad.yaml"
    bad_key.write_text("trainer:\n  learning_rate: 1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'trainer.learning_rate'"):
        load_config(["--config", str(bad_key)])
    bad_type = tmp_path / "type.yaml"
    bad_type.write_text("trainer:\n  max_steps: many\n")
    with pytest.raises(ConfigError, match=r"type.yaml: trainer.max_steps: expected an integer"):
        load_config(["--config", str(bad_type)])
    bad_section = tmp_path / "section.yaml"
    bad_section.write_text("trainr:\n  lr: 1\n")
    with pytest.raises(ConfigError, match="unknown config section 'trainr'"):
        load_config(["--config", str(bad_section)])
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(["--config", str(tmp_path / "missing.yaml")])
    broken = tmp_path / "broken.yaml"
    broken.write_text("trainer: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(["--config", str(broken)])


def test_every_section_is_in_the_tree():
    assert set(to_dict(Config())) == {"model", "adapter", "data", "trainer", "rollout", "grpo", "rewards", "eval", "cluster", "logging",
                                      "export", "generate", "grade", "plan", "sweep", "study", "sae", "seed"}
    assert set(to_dict(Config())["sae"]) == {"collect", "train", "analyze", "explain", "concepts", "compare", "ablate",
                                             "report", "random_adapter"}


def test_old_spellings_are_aliases():
    cfg = load_config(["--rollout.max_new_tokens", "24", "--rollout.temperature", "0.7", "--sae.k", "8"])
    assert (cfg.eval.max_new_tokens, cfg.grpo.temperature, cfg.sae.train.k) == (24, 0.7, 8)
    # a run folder saved before the eval section existed reads back
    old = from_dict({"rollout": {"max_new_tokens": 99, "temperature": 0.5, "backend": "transformers"}, "sae": {"k": 4, "expansion": 2}})
    assert (old.eval.max_new_tokens, old.grpo.temperature, old.rollout.backend, old.sae.train.k, old.sae.train.expansion) == (
        99, 0.5, "transformers", 4, 2)


def test_every_command_takes_config_and_dotted_flags(tmp_path):
    from rank1.core.commands import EVAL, EXPORT, GENERATE, GRADE, PLAN, SAE_COMMANDS
    from rank1.core.flags import parse_command

    f = tmp_path / "c.yaml"
    f.write_text("seed: 7\nmodel:\n  revision: abc\n")
    for command in (EVAL, EXPORT, GENERATE, GRADE, PLAN, *SAE_COMMANDS.values()):
        positional = [str(f)] if command.config_positional else ["x"] * len(command.positionals)
        cfg = parse_command(command, [*positional, "--config", str(f), "--rewards.timeout_s", "3"], check=False)
        assert (cfg.seed, cfg.model.revision, cfg.rewards.timeout_s) == (7, "abc", 3.0), command.name
    # a command's own section by short names; booleans as --flag / --no-flag
    cfg = parse_command(SAE_COMMANDS["train"], ["--activations", "a", "--out", "o", "--k", "4", "--no-normalize", "--effect"])
    assert (cfg.sae.train.k, cfg.sae.train.normalize, cfg.sae.train.effect) == (4, False, True)
    with pytest.raises(ConfigError, match=r"rank1 sae train: --out \(sae.train.out\) is required"):
        parse_command(SAE_COMMANDS["train"], ["--activations", "a"])
    with pytest.raises(ConfigError, match=r"eval.n: 2 samples cannot give pass@4"):
        parse_command(EVAL, ["--k", "4", "--n", "2"])


def test_plan_gpu_choices_are_the_plans_table():
    import typing

    from rank1.core.config import PlanConfig
    from rank1.core.flags import field_types
    from rank1.driver.plan import GPUS

    assert typing.get_args(field_types(PlanConfig)["gpu"]) == tuple(GPUS)


def test_defaults_follow_the_objective_and_where_the_adapter_starts(tmp_path):
    from rank1.core.config import BOXED_INSTRUCTION, GRPO_LR, SFT_LR

    sft, grpo = load_config([]), load_config(["--objective", "grpo"])
    assert (sft.trainer.lr, grpo.trainer.lr) == (SFT_LR, GRPO_LR)
    assert grpo.rewards.functions == ["math", "format"] and grpo.grpo.instruction == BOXED_INSTRUCTION
    assert load_config(["--objective", "grpo", "--lr", "3e-5"]).trainer.lr == 3e-5  # what the user says wins
    run = tmp_path / "sft-run"
    (run / "adapter").mkdir(parents=True)
    (run / "config.yaml").write_text("trainer:\n  objective: sft\n")
    after_sft = load_config(["--objective", "grpo", "--adapter.init", str(run / "adapter")])
    # From an SFT adapter: its prompts (the bare question) and correctness alone (the format is learned).
    assert after_sft.grpo.instruction is None and after_sft.rewards.functions == ["math"]
    # ... and the measured larger batch, learning rate and length; from the base the small ones; SFT its own.
    shape = lambda c: (c.trainer.lr, c.grpo.prompts_per_step, c.grpo.num_generations, c.trainer.max_steps)  # noqa: E731
    assert shape(after_sft) == (1e-4, 16, 8, 30) and shape(grpo) == (GRPO_LR, 4, 4, 60) and shape(sft)[0::3] == (SFT_LR, 60)
    assert after_sft.trainer.micro_batch_size in (32, 4)  # 128 rows in forwards of 32 on a CPU learner (4 with a GPU)
    mine = load_config(["--objective", "grpo", "--adapter.init", str(run / "adapter"), "--lr", "2e-5", "--grpo.num_generations", "4",
                        "--max-steps", "5"])
    assert shape(mine) == (2e-5, 16, 4, 5)
    (run / "config.yaml").write_text("trainer:\n  objective: grpo\ngrpo:\n  instruction: Think.\n")
    assert load_config(["--objective", "grpo", "--adapter.init", str(run / "adapter")]).grpo.instruction == "Think."
    kept = load_config(["--objective", "grpo", "--adapter.init", str(run / "adapter"), "--grpo.instruction", "Be brief."])
    assert kept.grpo.instruction == "Be brief."


def test_micro_batch_follows_the_objective():
    import torch

    from rank1.core.config import GRPO_MAX_MICRO_BATCH, SFT_MICRO_BATCH

    if torch.cuda.is_available():
        pytest.skip("a local GPU keeps the SFT micro-batch for every objective (checked below with the device flags)")

    assert load_config([]).trainer.micro_batch_size == SFT_MICRO_BATCH == 4
    grpo = ["--objective", "grpo"]
    # GRPO: a learner's whole share of the rollout batch, in equal forwards of at most GRPO_MAX_MICRO_BATCH rows.
    assert load_config(grpo).trainer.micro_batch_size == 16  # 4 prompts x 4: one forward
    assert GRPO_MAX_MICRO_BATCH == 32
    sized = {(16, 8, 1): 32, (16, 8, 2): 32, (3, 4, 1): 12, (5, 8, 1): 20, (6, 8, 4): 12, (9, 4, 1): 18, (3, 2, 4): 1}
    for (prompts, g, learners), expected in sized.items():
        cfg = load_config([*grpo, "--grpo.prompts_per_step", str(prompts), "--grpo.num_generations", str(g),
                           "--trainer.num_learners", str(learners)])
        assert cfg.trainer.micro_batch_size == expected, (prompts, g, learners)
    assert load_config([*grpo, "--trainer.micro_batch_size", "2"]).trainer.micro_batch_size == 2  # what the user says wins
    # Learners that may be on a GPU keep the SFT default: there memory, not matmul size, bounds a forward.
    for gpu in (["--trainer.device", "cuda"], ["--cluster.gpus_per_learner", "1"]):
        assert load_config([*grpo, "--grpo.prompts_per_step", "16", "--grpo.num_generations", "8", *gpu]).trainer.micro_batch_size == 4
    with pytest.raises(ConfigError, match="not a multiple of trainer.micro_batch_size"):
        from rank1.trainer.grpo import GRPOObjective

        GRPOObjective.from_config(load_config([*grpo, "--grpo.prompts_per_step", "3", "--grpo.num_generations", "2",
                                               "--trainer.num_learners", "4"]))
