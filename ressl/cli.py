"""The ``ressl`` command: parse arguments, call the library, turn user mistakes into one-line errors."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import io
import itertools
import json
import math
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import ressl
from ressl import allocator, config, launcher
from ressl.config import FIELDS, ConfigError
from ressl.errors import (
    CheckpointError,
    DataError,
    Interrupted,
    LateDataError,
    NonFiniteLoss,
    StoppedWithRankZero,
    WriteError,
    own_message,
)

# Only what parses the command line is imported above: torch and the modules that use it load once the command is
# known to be well formed, so --help and a mistyped flag answer at once.

USER_ERRORS = (ConfigError, DataError, CheckpointError)  # the user's input: one line, exit code 2


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors, exit code 2, and suggestions: a mistyped command, a mistyped flag (from
    the subcommand's own flags), or a flag that belongs to another subcommand."""

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        global _given
        _given = list(sys.argv[1:] if args is None else args)
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:  # report them from the subcommand they were given to, with its flags and its --help
            subcommands = self._subcommands()
            command = getattr(parsed, "command", None)
            parser = subcommands.get(command, self) if isinstance(command, str) else self
            parser.unrecognized(extras, subcommands)
        return parsed

    def _subcommands(self) -> dict[str, Parser]:
        return {name: p for a in self._actions if isinstance(a, argparse._SubParsersAction) for name, p in a.choices.items()}

    def _long_flags(self) -> list[str]:
        return sorted({o for a in self._actions for o in a.option_strings if o.startswith("--")})

    def unrecognized(self, extras: list[str], subcommands: dict[str, Parser]) -> NoReturn:
        message = f"unrecognized arguments: {' '.join(extras)}"
        for flag in dict.fromkeys(a.split("=")[0] for a in extras if a.startswith("--")):
            owners = [name for name, p in subcommands.items() if p is not self and flag in p._long_flags()]
            if owners:
                where = ", ".join(owners[:-1]) + (" and " if len(owners) > 1 else "") + owners[-1]
                message += f" ({flag} is a flag of ressl {where}, not of {self.prog})"
                continue
            hint = difflib.get_close_matches(flag, self._long_flags(), n=1)
            if hint:
                message += f" (did you mean {hint[0]}?)"
        self.error(message)

    def _typed_for(self, missing: list[str]) -> str:
        """`` (--checkpont: did you mean --checkpoint?)`` for each flag given that this parser does not know and that
        is close to one of the ``missing`` required flags."""
        known = self._long_flags()
        hints = []
        for flag in dict.fromkeys(a.split("=")[0] for a in _given if a.startswith("--") and a.split("=")[0] not in known):
            close = difflib.get_close_matches(flag, missing, n=1)
            if close:
                hints.append(f" ({flag}: did you mean {close[0]}?)")
        return "".join(hints)

    def error(self, message: str) -> NoReturn:
        choice = re.match(r"argument (\S+): invalid choice: '?(.*?)'? \(choose from (.*)\)$", message)
        if choice:
            name, value, listed = choice.groups()
            choices = [c.strip().strip("'\"") for c in listed.split(",")]
            hint = difflib.get_close_matches(value, choices, n=1)
            what = "unknown command" if name == "command" else f"argument {name}: invalid choice"
            suggest = f" (did you mean {hint[0]}?)" if hint else ""
            if name == "--split" and value.lower().startswith("val"):
                suggest = " (a val/ folder, like test/ or test.npz, is the test split: --split test)"
            message = f"{what} {value!r}{suggest}; choose from {', '.join(choices)}"
        values = {i + 1 for i, (a, b) in enumerate(itertools.pairwise(_given)) if a.startswith("-") and "=" not in a}
        bare = [a for i, a in enumerate(_given) if a.endswith(".pt") and not a.startswith("-") and i not in values]
        if "required: --checkpoint" in message and bare:
            message += f" (give the checkpoint with its flag: --checkpoint {bare[0]})"
        required = re.match(r"the following arguments are required: (.*)$", message)
        if required:  # a required flag mistyped is unknown to argparse, which reports only the one missing
            message += self._typed_for(required.group(1).split(", "))
        speaks = launcher.speaks_for_machine()
        if not speaks:
            _let_the_speaker_speak()
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n" if speaks else None)


_given: list[str] = []  # the command line that Parser.parse_args is parsing (set by it), for the hints of Parser.error


def _let_the_speaker_speak() -> None:
    """A process that leaves a mistake to its machine's first process to report waits a moment before it exits:
    torchrun ends every process once one exits with an error, and the first one may not have printed yet (with
    torch not loaded, a mistake is found within a fraction of a second of starting)."""
    if launcher.launched_world_size() > 1:
        time.sleep(3.0)


DEMO_PRESET = "digits"  # what `ressl pretrain` starts from with no --preset, --dataset or --data

PRETRAIN_DEFAULTS = (
    f"Defaults: with no --preset, --dataset or --data, the {DEMO_PRESET} demo preset applies (its values are shown "
    f"below as '{DEMO_PRESET} demo: ...'); --dataset NAME of a preset starts from that preset; otherwise (e.g. "
    "--dataset folder --data photos) the defaults listed below apply. Flags override all of these."
)


def _field_help(name: str, demo: dict[str, Any], notes: dict[str, str]) -> str:
    """The field's comment in ``ressl.config.Config`` (what it is and why its default), then its type and defaults."""
    kinds, optional = config.field_types(name)
    default = FIELDS[name].default
    note = notes.get(name, "").replace("%", "%%")  # argparse formats help with %
    text = f"{note + '. ' if note else ''}{'/'.join(k.__name__ for k in kinds)}{' or none' if optional else ''}, default {default!r}"
    if name in demo and demo[name] != default:
        text += f" ({DEMO_PRESET} demo: {demo[name]!r})"
    return text


def path(text: str) -> str:
    """An argparse type for paths: an empty one (``--data "$DATA"`` with DATA unset) would read the current directory."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty (an unset shell variable?): give a path")
    return text


def add_config_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    group = parser.add_argument_group("configuration fields (override the preset; see ressl/presets/*.yaml)")
    demo, notes = config.load_preset(DEMO_PRESET), config.field_notes()
    for name in FIELDS:
        if name in skip or name == "extra":
            continue
        kinds, _ = config.field_types(name)
        extra: dict[str, Any] = {"nargs": "?", "const": "true"} if kinds[0] is bool else {}
        group.add_argument(f"--{name}", dest=f"cfg_{name}", default=argparse.SUPPRESS, metavar="VALUE",
                           help=_field_help(name, demo, notes), **extra)


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_")}


def build_parser() -> Parser:
    parser = Parser(prog="ressl", allow_abbrev=False, description="ReSSL: relational self-supervised pretraining and evaluation.")
    parser.add_argument("--version", action="version", version=f"ressl {ressl.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("pretrain", allow_abbrev=False, help="pretrain an encoder by ReSSL",
                       description="Pretrain by ReSSL. With no arguments: the embedded digits demo, a few minutes on a CPU. "
                                   + PRETRAIN_DEFAULTS)
    p.add_argument("--preset", type=path, help=f"defaults to start from: {', '.join(config.preset_names())} (see Defaults above), "
                                    "or a .yaml file of fields (one's own, or a run's config.yaml to repeat it in a new --out)")
    add_config_flags(p)

    for name, what in (("knn", "weighted kNN accuracy of a checkpoint's frozen backbone"),
                       ("linear", "linear-probe accuracy of a checkpoint's frozen backbone")):
        e = sub.add_parser(name, allow_abbrev=False, help=what, description=what[0].upper() + what[1:] + ".")
        e.add_argument("--checkpoint", type=path, required=True, help="RUN_DIR/checkpoint.pt")
        e.add_argument("--data", type=path, help="dataset directory (default: the one the run was trained on)")
        e.add_argument("--dataset", help="dataset name (default: the run's)")
        e.add_argument("--teacher", action="store_true", help="evaluate the teacher's backbone instead of the student's")
        e.add_argument("--device", default="auto")
        e.add_argument("--batch_size", type=int, default=512, help="images per forward pass")
        e.add_argument("--workers", type=int, default=4)
        e.add_argument("--max_bad_fraction", type=float, help="share of unreadable image files skipped (with a warning) before the command stops (default: the run's max_bad_fraction)")
        if name == "knn":
            e.add_argument("--k", type=int, help="neighbours (default: the run's knn_k, the k of its own kNN checks)")
            e.add_argument("--temperature", type=float,
                           help="vote temperature (default: the run's knn_temperature, that of its own kNN checks)")
        else:
            e.add_argument("--epochs", type=int, default=100, help="probe epochs (default 100, the paper)")
            e.add_argument("--lr", type=float, default=0.1,
                           help="probe learning rate on standardised features, cosine-decayed (default 0.1)")
            e.add_argument("--weight_decay", type=float, default=0.0, help="the probe's weight decay (default 0)")
            e.add_argument("--augment", action="store_true",
                           help="random crops (see --crop_min_scale) and flips (if the run flipped) of the training "
                                "images every epoch, a backbone pass per epoch, instead of features cached once (the "
                                "fast default)")
            e.add_argument("--crop_min_scale", type=float,
                           help="with --augment: the crops' smallest share of the image (default 0.08: the linear "
                                "protocol of MoCo and of the official ReSSL code, whatever the run pretrained with)")
    x = sub.add_parser("export", allow_abbrev=False, help="write a checkpoint's backbone as safetensors (torchvision keys)",
                       description="Write the student's (or teacher's) backbone with torchvision's key names.")
    x.add_argument("--checkpoint", type=path, required=True, help="RUN_DIR/checkpoint.pt")
    x.add_argument("--out", type=path, required=True, help="output file, e.g. backbone.safetensors")
    x.add_argument("--teacher", action="store_true", help="export the teacher's backbone instead of the student's")
    add_report_commands(sub)
    return parser


def check_numbers(args: argparse.Namespace) -> None:
    """The evaluation subcommands' numeric flags and --device, checked before anything is loaded."""
    at_least = {"batch_size": 1, "workers": 0, "k": 1, "epochs": 1, "max_points": 1}
    for name, low in at_least.items():
        value = getattr(args, name, None)
        if value is not None and value < low:
            raise ConfigError(f"--{name} must be at least {low}, got {value}")
    scale = getattr(args, "crop_min_scale", None)
    if scale is not None and not 0 < scale <= 1:
        raise ConfigError(f"--crop_min_scale must be in (0, 1], got {scale}")
    if scale is not None and not args.augment:
        raise ConfigError("--crop_min_scale sets the crops of --augment: add --augment, or leave it out")
    for name in ("temperature", "lr", "weight_decay"):
        value = getattr(args, name, None)
        if value is not None and not math.isfinite(value):
            raise ConfigError(f"--{name} must be a finite number, got {value}")
        if value is not None and (value < 0 or (value == 0 and name != "weight_decay")):
            raise ConfigError(f"--{name} must be {'0 or more' if name == 'weight_decay' else 'positive'}, got {value}")
    bad = getattr(args, "max_bad_fraction", None)
    if bad is not None and not 0 <= bad <= 1:
        raise ConfigError(f"--max_bad_fraction must be in [0, 1], got {bad}")
    if hasattr(args, "device"):
        config.check_device(args.device, "--device")


def cmd_export(args: argparse.Namespace) -> int:
    from ressl.export import export_backbone

    if launcher.launched_rank() != 0:  # started by torchrun or srun: one process writes the file
        return 0
    meta = export_backbone(args.checkpoint, args.out, args.teacher)
    print(f"wrote {args.out}: {meta['network']} {meta['architecture']} (width {meta['width']}, small stem "
          f"{meta['small_stem']}, max-pool {meta['maxpool']})")
    if meta["width"] != "64":  # torchvision's ResNets are width 64: this file loads into ressl's own build of it
        print(f"  width {meta['width']} is not torchvision's 64: load it into ressl.build_backbone({meta['architecture']!r}, "
              f"{meta['small_stem'].title()}, {meta['width']}, maxpool={meta['maxpool'].title()})[0]")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    values = overrides(args)
    preset = args.preset
    if preset is None and values.get("dataset") in config.preset_names():
        preset = values["dataset"]  # --dataset cifar10 starts from the cifar10 preset
    elif preset is None and "dataset" not in values and "data" not in values:
        preset = "digits"  # no arguments: the embedded demo
    chosen = config.load_preset(preset) if preset else {}
    data = values.get("data", chosen.get("data"))
    if data is not None and "dataset" not in values and "dataset" not in chosen:  # data alone: arrays or images, as such
        values["dataset"] = "npz" if (Path(str(data)).expanduser() / "train.npz").is_file() else "folder"
    cfg = config.resolve(preset, values)
    out = config.check_output(cfg.out or config.default_out(cfg), "--out")  # before torch, the data and the model load
    from ressl import checkpoint
    from ressl.rundir import check_outside_data
    from ressl.train import pretrain

    check_outside_data(out, cfg)
    cfg = dataclasses.replace(cfg, out=str(out))  # the default --out, named once
    unused = [f"{key}: {chosen[key]}" for key in config.PER_RUN if chosen.get(key) and key not in values]
    if unused and launcher.launched_rank() == 0:  # e.g. a run's config.yaml, repeated as a new run
        print(f"note: {preset} sets {' and '.join(unused)}, which a preset file never does (it may be another run's): this "
              f"run goes to {out}; --out and --resume set them", flush=True)
    if cfg.resume and not Path(cfg.resume).is_file():
        checkpoint.load(cfg.resume)  # a missing checkpoint or a directory: its one-line error, before the data loads
    pretrain(cfg)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    check_numbers(args)  # before torch loads
    from ressl import dist
    from ressl.evaluate import PROBE_CROP_MIN_SCALE, accuracy_text, evaluate_checkpoint

    extra = {"k": args.k, "temperature": args.temperature} if args.command == "knn" else {
        "epochs": args.epochs, "lr": args.lr, "weight_decay": args.weight_decay, "augment": args.augment,
        "crop_min_scale": PROBE_CROP_MIN_SCALE if args.crop_min_scale is None else args.crop_min_scale}
    def say(message: str) -> None:  # asked once the process group exists (under torchrun rank 0 speaks)
        if dist.is_main():
            print(f"ressl {args.command}: {message}", file=sys.stderr, flush=True)

    result = evaluate_checkpoint(args.checkpoint, args.command, args.data, args.dataset, args.teacher, args.device,
                                 args.batch_size, args.workers, say=say, max_bad_fraction=args.max_bad_fraction, **extra)
    if dist.is_main():
        used = f" (k {result['k']}, temperature {result['temperature']})" if args.command == "knn" else ""
        print(f"{args.command}{used}: {accuracy_text(result, int(result['classes']))}")
        print(json.dumps(result))
    return 0


# --- report and embed: what a run learned (ressl.report) ---------------------------------------


def add_report_commands(sub: Any) -> None:
    r = sub.add_parser("report", allow_abbrev=False, help="write RUN_DIR/report.md and report.html: curves, embedding map, retrieval",
                       description="Write RUN_DIR/report.md and RUN_DIR/report.html (PNGs embedded, opens offline): the "
                                   "configuration, final metrics, loss/learning-rate/kNN/health curves, a 2-D map of the "
                                   "test embeddings and a retrieval grid.")
    r.add_argument("run_dir", type=path, metavar="RUN_DIR", help="a run directory (the --out of ressl pretrain)")
    r.add_argument("--data", type=path, help="dataset directory for the embedding plots (default: the one the run was trained on)")
    r.add_argument("--dataset", help="dataset name (default: the run's)")
    r.add_argument("--no-embeddings", dest="embeddings", action="store_false",
                   help="skip the embedding map and retrieval grid (no checkpoint or data needed)")
    r.add_argument("--max_points", type=int, default=2000, help="test images in the 2-D map (default 2000)")
    r.add_argument("--device", default="auto")
    r.add_argument("--batch_size", type=int, default=512, help="images per forward pass")
    r.add_argument("--workers", type=int, default=4)

    m = sub.add_parser("embed", allow_abbrev=False, help="write a checkpoint's backbone features of a data set as .npy",
                       description="Backbone features (N, F) float32 of a split, in order, and FILE.files.txt naming each "
                                   "row (the image path for folders, SPLIT:INDEX for in-memory sets).")
    m.add_argument("--checkpoint", type=path, required=True, help="RUN_DIR/checkpoint.pt")
    m.add_argument("--data", type=path, help="dataset directory: an image folder, train.npz/test.npz, or a torchvision root "
                   "(default: the one the run was trained on)")
    m.add_argument("--dataset", help="dataset name (default: the run's; 'folder' or 'npz' for other data)")
    m.add_argument("--split", choices=("train", "test"), default="train", help="which split (default train)")
    m.add_argument("--teacher", action="store_true", help="the teacher's backbone instead of the student's")
    m.add_argument("--out", type=path, required=True, help="output file, e.g. features.npy")
    m.add_argument("--device", default="auto")
    m.add_argument("--batch_size", type=int, default=512, help="images per forward pass")
    m.add_argument("--workers", type=int, default=4)
    m.add_argument("--max_bad_fraction", type=float, help="share of unreadable image files skipped (with a warning) before the command stops (default: the run's max_bad_fraction)")


def cmd_report(args: argparse.Namespace) -> int:
    check_numbers(args)  # before torch loads
    if launcher.launched_world_size() > 1:
        raise ConfigError("ressl report runs in one process (its embeddings are a few thousand images): run it without torchrun or srun")
    from ressl.report import make_report

    report = make_report(args.run_dir, args.data, args.dataset, args.embeddings, args.device, args.batch_size,
                         args.workers, args.max_points, say=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"wrote {report.markdown} and {report.html} ({len(report.images)} plots)")
    for note in report.notes:  # each says what it left out, or what it could not read
        print(f"  note: {note}")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    check_numbers(args)  # before torch loads
    config.check_output(args.out, "--out", file_example="features.npy")
    if Path(args.out).suffix != ".npy":  # the rows' origins go to NAME.files.txt: NAME and NAME.npy would share it
        raise ConfigError(f"--out {args.out}: name the features file with .npy, e.g. --out {Path(args.out).with_suffix('.npy')}")
    from ressl import dist
    from ressl.embed import embed

    out, files, (n, dim) = embed(args.checkpoint, args.data, args.out, args.dataset, args.split, args.teacher,
                                 args.device, args.batch_size, args.workers, args.max_bad_fraction)
    if dist.is_main():
        print(f"wrote {out}: {n} x {dim} float32 features ({args.split} split), row origins in {files}")
    return 0


REPORT_COMMANDS = {"report": cmd_report, "embed": cmd_embed}


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # a path the terminal's encoding cannot show is written escaped (\u0440),
        if isinstance(stream, io.TextIOWrapper):  # not an error after the work is done (stderr escapes already)
            stream.reconfigure(errors="backslashreplace")
    parser = build_parser()
    args = parser.parse_args(argv)
    allocator.keep_freed_memory()  # CPU steps reuse their memory instead of page-faulting it in again
    code = _run(args)
    dist = _loaded_dist()
    if dist is not None:  # a command that got as far as torch: under torchrun, close the process group
        dist.leave(together=code == 0)
    return code


def _run(args: argparse.Namespace) -> int:
    """The command, with its errors as one line and its exit code. Torch loads inside (each command imports what it
    uses), so that a Ctrl-C during its seconds of import is an interruption too, and a mistake in the flags or the
    configuration is said before it."""
    try:
        if args.command == "pretrain":
            return cmd_pretrain(args)
        if args.command == "export":
            return cmd_export(args)
        if args.command in REPORT_COMMANDS:
            return REPORT_COMMANDS[args.command](args)
        return cmd_evaluate(args)
    except (NonFiniteLoss, WriteError) as err:  # not the user's input: exit 1
        from ressl import dist  # loaded already by whatever raised these (as in each branch below)

        if dist.is_main() or not isinstance(err, NonFiniteLoss):  # under torchrun every process stops at the same NaN
            print(f"ressl {args.command}: error: {err}", file=sys.stderr)
        return 1
    except StoppedWithRankZero:  # rank 0 could not write a file of the run, and says why
        return 1
    except RuntimeError as err:  # torch.OutOfMemoryError is one too
        from ressl import dist

        if out_of_memory(err):
            lower = "--batch_size (or --queue_size, --width, --image_size)" if args.command == "pretrain" else "--batch_size"
            who = f"[rank {dist.launched_rank()}] " if dist.launched_world_size() > 1 else ""  # one GPU may run out alone
            print(f"ressl {args.command}: error: {who}out of memory{_allocation(err)}: lower {lower}", file=sys.stderr)
            return 1
        if not dist.peer_lost(err):
            raise
        if dist.is_main():  # rank 0 says it once; the process that failed gives the reason
            print(f"ressl {args.command}: error: another process stopped on an error (its message is above or in its "
                  "machine's log); this one stopped with it", file=sys.stderr)
        return 1
    except USER_ERRORS as err:
        # under torchrun every process of a machine makes the same mistake; images that break after the scan may fail
        # to load in some processes only, which tell all the others why they stop: rank 0 says it for them all
        dist = _loaded_dist()  # raised before torch loaded, or by code that imported ressl.dist
        if isinstance(err, LateDataError) and dist is not None and dist.is_distributed():
            if dist.is_main():
                print("\n".join(f"ressl {args.command}: error: {line}" for line in str(err).splitlines()), file=sys.stderr)
        elif launcher.speaks_for_machine():
            print(f"ressl {args.command}: error: {own_message(err)}", file=sys.stderr)
        else:
            _let_the_speaker_speak()
        return 2
    except Interrupted as err:
        from ressl import dist

        if dist.is_main():  # every process stopped at the same step, with the same message
            print(f"ressl {args.command}: {err}", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        return _interrupted(args)


def _loaded_dist() -> Any:
    """``ressl.dist`` if the command got as far as importing it (and torch; only then can a process group exist),
    else None: what a mistake met before torch loads may consult without loading it."""
    return sys.modules.get("ressl.dist")


def _interrupted(args: argparse.Namespace) -> int:
    """Ctrl-C: say where the work stands (pretrain's last checkpoint, when --out was given) and exit 130."""
    out = getattr(args, "cfg_out", None)
    saved = Path(out) / "checkpoint.pt" if out else None
    note = "" if saved is None else f"; the last checkpoint is {saved}" if saved.is_file() else "; no checkpoint was written yet"
    print(f"\nressl {args.command}: interrupted{note}", file=sys.stderr)
    return 130


def _allocation(err: RuntimeError) -> str:
    """`` (tried to allocate 64 GB)``, read from PyTorch's message (CPU: "you tried to allocate N bytes"; CUDA: "Tried to
    allocate 20.00 GiB"); empty when it says no size."""
    found = re.search(r"tried to allocate (\d+) bytes", str(err)) or re.search(r"[Tt]ried to allocate ([\d.]+ [KMGT]i?B)", str(err))
    if found is None:
        return ""
    size = found.group(1)
    return f" (tried to allocate {int(size) / 1e9:,.1f} GB)" if size.isdigit() else f" (tried to allocate {size})"


def out_of_memory(err: RuntimeError) -> bool:
    """Whether ``err`` is an allocation that failed: on a GPU (``torch.OutOfMemoryError``) or in host memory."""
    text = str(err)
    return type(err).__name__ == "OutOfMemoryError" or "can't allocate memory" in text or "CUDA out of memory" in text


if __name__ == "__main__":
    sys.exit(main())
