"""The small CORE eval bundle the tests use, and a way to zip it like the real one."""

import os
import zipfile

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "eval_bundle")


def make_bundle_zip(path, top="eval_bundle"):
    """The fixture directory zipped like the real eval_bundle.zip (one top folder)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for root, _, files in os.walk(FIXTURE):
            for f in sorted(files):
                full = os.path.join(root, f)
                zf.write(full, os.path.join(top, os.path.relpath(full, FIXTURE)))
    return path
