"""Tests of the analytic Shapes checker: 100% on clean renders, and each corrupted caption
attribute flagged exactly."""

import dataclasses
import json
import math

import numpy as np
import pytest

from pocketdiff.data.shapes import (
    PALETTE, SHAPES, SIZES, Scene, ShapeObject, caption, render, sample_batch, sample_scene,
)
from pocketdiff.eval.checker import ATTRIBUTES, aggregate, check


def failures(result: dict) -> set:
    """Everything the checker flags: "background", ("extra", cell), (cell, attribute)."""
    found = set() if result["background"]["correct"] else {"background"}
    found |= {("extra", cell) for cell in result["extra_cells"]}
    for o in result["objects"]:
        if not o["present"]:
            found.add((o["cell"], "present"))  # colour/shape/size are moot without an object
        else:
            found |= {(o["cell"], a) for a in ATTRIBUTES if not o[a]}
    assert result["all_correct"] == (not found)
    return found


@pytest.mark.parametrize("split", ["all", "heldout"])
def test_clean_renders_score_100_percent(split):
    images, captions, scenes = sample_batch(np.random.default_rng(11), 150, split=split)
    results = [check(image, scene) for image, scene in zip(images, scenes)]
    assert [failures(r) for r in results] == [set()] * len(results)
    summary = aggregate(results, scenes)
    assert summary["all_correct"] == 1.0
    assert all(summary[a] == 1.0 for a in ATTRIBUTES + ("background", "no_extra"))


def test_caption_and_scene_give_the_same_result():
    images, captions, scenes = sample_batch(np.random.default_rng(2), 4, split="all")
    for image, text, scene in zip(images, captions, scenes):
        assert check(image, text)["all_correct"] and check(image, scene)["all_correct"]


def replace_object(scene: Scene, i: int, **changes) -> Scene:
    objects = list(scene.objects)
    objects[i] = dataclasses.replace(objects[i], **changes)
    return dataclasses.replace(scene, objects=tuple(sorted(objects, key=lambda o: o.cell)))


def other(rng: np.random.Generator, options, *excluded):
    choices = [x for x in options if x not in excluded]
    return choices[rng.integers(len(choices))]


def corrupt(kind: str, scene: Scene, rng: np.random.Generator) -> tuple[Scene, set]:
    """A caption scene differing from `scene` in one way, and the failures it must cause."""
    i = int(rng.integers(len(scene.objects)))
    obj = scene.objects[i]
    used_colours = {o.colour for o in scene.objects} | {scene.background}
    empty = [c for c in range(9) if c not in {o.cell for o in scene.objects}]
    if kind == "colour":
        return replace_object(scene, i, colour=other(rng, PALETTE, *used_colours)), {(obj.cell, "colour")}
    if kind == "shape":
        return replace_object(scene, i, shape=other(rng, SHAPES, obj.shape)), {(obj.cell, "shape")}
    if kind == "size":
        return replace_object(scene, i, size=other(rng, SIZES, obj.size)), {(obj.cell, "size")}
    if kind == "background":
        return dataclasses.replace(scene, background=other(rng, PALETTE, *used_colours)), {"background"}
    if kind == "remove":
        kept = tuple(o for o in scene.objects if o is not obj)
        return dataclasses.replace(scene, objects=kept), {("extra", obj.cell)}
    if kind == "add":
        cell = other(rng, empty)
        added = ShapeObject(other(rng, SHAPES), other(rng, PALETTE, *used_colours), "small", cell)
        objects = tuple(sorted(scene.objects + (added,), key=lambda o: o.cell))
        return dataclasses.replace(scene, objects=objects), {(cell, "present")}
    if kind == "move":
        cell = other(rng, empty)
        return replace_object(scene, i, cell=cell), {(cell, "present"), ("extra", obj.cell)}
    raise ValueError(kind)


CORRUPTIONS = ["colour", "shape", "size", "background", "remove", "add", "move"]


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_each_corruption_is_flagged_exactly(kind):
    rng = np.random.default_rng(CORRUPTIONS.index(kind))
    for _ in range(25):
        n_objects = int(rng.integers(2, 4)) if kind == "remove" else None  # keep one object
        scene = sample_scene(rng, n_objects=n_objects, split="all")
        wrong, expected = corrupt(kind, scene, rng)
        assert failures(check(render(scene), wrong)) == expected, (kind, caption(scene), caption(wrong))


def test_blank_image_finds_no_objects():
    scene = sample_scene(np.random.default_rng(0), n_objects=2, split="all")
    blank = np.broadcast_to(np.array(PALETTE[scene.background], np.uint8), (64, 64, 3)).copy()
    assert failures(check(blank, scene)) == {(o.cell, "present") for o in scene.objects}


def test_check_rejects_bad_images():
    with pytest.raises(ValueError):
        check(np.zeros((32, 32, 3), np.uint8), "a small red star at the top left on a yellow background")
    with pytest.raises(ValueError):
        check(np.zeros((64, 64, 3), np.float32), "a small red star at the top left on a yellow background")


def test_aggregate_groups_by_count_and_split():
    seen_one = Scene((ShapeObject("star", "red", "small", 0),), "yellow")
    held_two = Scene(
        (ShapeObject("star", "purple", "large", 1), ShapeObject("circle", "red", "small", 5)), "white"
    )
    image_one, image_two = render(seen_one), render(held_two)
    wrong_shape = replace_object(held_two, 0, shape="square")  # held-out object judged wrong
    results = [check(image_one, seen_one), check(image_two, held_two), check(image_two, wrong_shape)]
    summary = aggregate(results, [seen_one, caption(held_two), wrong_shape])

    assert summary["n"] == 3 and summary["all_correct"] == pytest.approx(2 / 3)
    assert summary["shape"] == pytest.approx(4 / 5) and summary["colour"] == 1.0
    assert summary["by_count"][1] == {**summary["by_count"][1], "n": 1, "all_correct": 1.0}
    assert summary["by_count"][2]["all_correct"] == 0.5
    assert summary["by_count"][3]["n"] == 0 and math.isnan(summary["by_count"][3]["all_correct"])
    # By scene: the corrupted caption names only seen pairs (purple square, red circle).
    assert summary["by_split"]["seen"]["n"] == 2 and summary["by_split"]["heldout"]["n"] == 1
    assert summary["by_split"]["seen"]["all_correct"] == 0.5
    assert summary["by_split"]["heldout"]["all_correct"] == 1.0
    # By object: only the purple star is a held-out pair.
    assert summary["objects_by_split"]["heldout"] == {
        "n": 1, "present": 1.0, "colour": 1.0, "shape": 1.0, "size": 1.0, "correct": 1.0,
    }
    assert summary["objects_by_split"]["seen"]["n"] == 4
    assert summary["objects_by_split"]["seen"]["shape"] == 0.75
    # By expected shape: the "square" of the corrupted caption was drawn as a star.
    assert summary["by_shape"]["square"] == {
        "n": 1, "present": 1.0, "shape": 0.0, "predicted": {s: int(s == "star") for s in SHAPES},
    }
    assert summary["by_shape"]["star"]["n"] == 2 and summary["by_shape"]["star"]["shape"] == 1.0
    assert summary["by_shape"]["circle"]["predicted"]["circle"] == 2
    assert summary["by_shape"]["heart"]["n"] == 0 and math.isnan(summary["by_shape"]["heart"]["shape"])
    # Results record the grouping themselves (compared as JSON because NaN != NaN).
    assert json.dumps(aggregate(results)) == json.dumps(summary)


def test_card_quality_survives_a_json_round_trip():
    import json

    from pocketdiff.eval.quality import card_quality

    r = {"n": 4, "steps": 2, "sampler": "lcm", "guidance": 3.0, "all_correct": 0.25, "seconds_per_image": 0.1,
         "clip_score": None, "fd": None, "by_count": {1: {"all_correct": 0.5}, 2: {"all_correct": 0.0}},
         "by_split": {"seen": {"all_correct": 0.25}, "heldout": {"all_correct": 0.0}}}
    for x in (r, json.loads(json.dumps(r))):  # counts become strings in JSON
        q = card_quality(x)
        assert q["single_object_all_correct"] == 0.5 and q["heldout_all_correct"] == 0.0 and q["steps"] == 2


def test_shape_markdown_names_the_shape_drawn_instead():
    from pocketdiff.eval.quality import shape_markdown

    scene = Scene((ShapeObject("star", "red", "large", 4),), "white")
    asked_square = replace_object(scene, 0, shape="square")
    summary = aggregate([check(render(scene), scene), check(render(scene), asked_square)])
    table = shape_markdown([("m", summary), ("again", json.loads(json.dumps(summary)))]).splitlines()
    assert table[0] == "| model | " + " | ".join(SHAPES) + " |" and len(table) == 4
    cells = dict(zip(SHAPES, table[2].strip("| ").split(" | ")[1:]))
    assert cells["star"] == "100" and cells["square"] == "0 (star)" and cells["heart"] == "n/a"
    assert table[3] == table[2].replace("| m |", "| again |")
