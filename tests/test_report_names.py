"""Layer names a report must draw: long, alike but for their beginning or end, in scripts the font
lacks. Every layer keeps a label of its own, and nothing but the report is said."""

from __future__ import annotations

import dataclasses
import random
import warnings

from series_builder import build

from gradwatch.report import render_html
from gradwatch.report.figures import short_name, short_names


def test_long_names_alike_but_for_their_end_keep_labels_of_their_own():
    """Three 200-character module names ending `00.0`, `01.0`, `02.0` were each drawn as `…0`."""
    names = ["L" * 198 + f"{i:02d}.0" for i in range(3)]
    labels = short_names(names)
    assert len(set(labels)) == 3 and all(len(label) <= 28 for label in labels)
    assert all(label.endswith(name[-4:]) for label, name in zip(labels, names))


def test_long_names_alike_but_for_their_beginning_keep_it():
    names = [f"{prefix}{'x' * 40}.block.0.linear" for prefix in ("encoder", "decoder")]
    labels = short_names(names)
    assert len(set(labels)) == 2 and [label[:3] for label in labels] == ["enc", "dec"]
    assert all(len(label) <= 28 for label in labels)


def test_names_that_shorten_apart_are_shortened_as_before():
    names = ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.attention.self.query", "fc1"]
    assert short_names(names) == [short_name(names[0]), short_name(names[1]), "fc1"]
    assert short_names(names)[0] == "…0.attention.self.query"


def test_names_in_scripts_the_font_lacks_are_drawn_without_a_warning_each():
    """A run with CJK and emoji module names: eight matplotlib warnings (`Glyph 23618 ... missing
    from font(s) DejaVu Sans`, naming gradwatch's figures.py) on stderr around the report."""
    run = build(n_steps=20, depth=3)
    names = {"fc0": "层_β", "fc1": "emoji_🔥", "fc2": "ключ"}
    run.layers = [dataclasses.replace(l, name=names.get(l.name, l.name)) for l in run.layers]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        page = render_html(run, findings=[])
    assert not [w for w in caught if "Glyph" in str(w.message)]
    assert "层_β" in page and "emoji_🔥" in page  # the tables keep the names whole


def test_names_alike_but_for_a_middle_part_keep_it():
    """BERT's `bert.encoder.layer.{0,1}.attention.output.LayerNorm` were both drawn as
    `bert.encoder.…tput.LayerNorm`: the layer number, the one difference, was cut away."""
    names = [f"bert.encoder.layer.{i}.{part}" for i in range(12)
             for part in ("attention.self.query", "attention.output.LayerNorm", "output.LayerNorm", "output.dense")]
    labels = short_names(names)
    assert len(set(labels)) == len(names) and all(len(label) <= 28 for label in labels)
    for name, label in zip(names, labels):
        number = name.split(".")[3]
        assert f"…{number}." in label or f".{number}." in label  # the layer number is in the label


def test_random_look_alike_names_always_get_labels_of_their_own():
    rng = random.Random(0)
    for _ in range(300):
        names = list(dict.fromkeys("".join(rng.choice("ab.") for _ in range(rng.randint(1, 60)))
                                   for _ in range(rng.randint(2, 30))))
        labels = short_names(names)
        assert len(set(labels)) == len(names) and max(map(len, labels)) <= 28
