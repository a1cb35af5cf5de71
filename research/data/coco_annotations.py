"""One normalisation of COCO-format annotation json, shared by the dataset builder and the evaluator.

Exporters write valid COCO files that pycocotools cannot score as they are, and the builder and the
evaluator used to read them differently (the builder converted ids, the evaluator did not). Both now
read `normalize(json)`: what is trained on is what is scored.

  image / annotation / category ids  written as strings ("101") -> int
  iscrowd missing                    -> 0
  bbox missing or null               -> the bounding box of the polygon segmentation, if any;
                                        else the annotation is dropped (reported)
  area missing                       -> the box's w * h
  anything unusable                  (an id that is no integer, a malformed box) dropped, reported

Each problem is a `research.data.validation.Problem` naming the file, the ids, what is wrong and
what was done.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

from research.data.validation import Problem


def _int(v) -> int:
    if isinstance(v, bool):
        raise ValueError(v)
    if isinstance(v, float) and not v.is_integer():
        raise ValueError(v)
    return int(v)


def _polygon_box(segmentation) -> list[float] | None:
    if not isinstance(segmentation, list) or not segmentation:
        return None
    xs, ys = [], []
    for poly in segmentation:
        if not isinstance(poly, list) or len(poly) < 6:
            continue
        xs += [float(x) for x in poly[0::2]]
        ys += [float(y) for y in poly[1::2]]
    if not xs:
        return None
    return [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]


def normalize(dataset: Mapping[str, Any], source: str = "annotations") -> tuple[dict, list[Problem]]:
    """(a normalised deep copy of a COCO-format dict, the list of problems found), see the module doc.

    Args:
      dataset: the parsed json (images, annotations, categories).
      source: the file it came from, named in each problem.
    """
    data = copy.deepcopy(dict(dataset))
    problems: list[Problem] = []
    images = []
    for info in data.get("images", []) or []:
        try:
            info = dict(info, id=_int(info["id"]))
        except (KeyError, TypeError, ValueError):
            problems.append(Problem(source, f"image entry without an integer id: {info!r}", "dropped"))
            continue
        images.append(info)
    data["images"] = images
    cats = []
    for cat in data.get("categories", []) or []:
        try:
            cats.append(dict(cat, id=_int(cat["id"])))
        except (KeyError, TypeError, ValueError):
            problems.append(Problem(source, f"category without an integer id: {cat!r}", "dropped"))
    data["categories"] = cats
    anns = []
    for k, a in enumerate(data.get("annotations", []) or []):
        aid = a.get("id", f"#{k}") if isinstance(a, Mapping) else f"#{k}"
        try:
            a = dict(a, image_id=_int(a["image_id"]), category_id=_int(a["category_id"]))
            a["id"] = _int(a.get("id", k + 1))
        except (KeyError, TypeError, ValueError):
            problems.append(Problem(source, "annotation without a valid image_id/category_id/id", "dropped",
                                    annotation_id=aid))
            continue
        box = a.get("bbox")
        if box is None:
            box = _polygon_box(a.get("segmentation"))
            if box is None:
                problems.append(Problem(source, "no bbox and no polygon segmentation", "dropped",
                                        a["image_id"], aid))
                continue
            problems.append(Problem(source, "no bbox", "box taken from its polygon segmentation",
                                    a["image_id"], aid))
        try:
            box = [float(v) for v in box]
            if len(box) != 4:
                raise ValueError(box)
        except (TypeError, ValueError):
            problems.append(Problem(source, f"malformed bbox {a.get('bbox')!r}", "dropped", a["image_id"], aid))
            continue
        a["bbox"] = box
        a.setdefault("iscrowd", 0)
        a["iscrowd"] = int(bool(a["iscrowd"]))
        if a.get("area") is None:
            a["area"] = max(box[2], 0.0) * max(box[3], 0.0)
        anns.append(a)
    data["annotations"] = anns
    return data, problems
