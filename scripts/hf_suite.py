"""transformers' own model tests on models patched by fastbert.patch_hf (issue 26).

Runs tests/models/<family>/test_modeling_<family>.py of a transformers source tree (with its
common model tests) three times -- unpatched, every model patch_hf'd (unpadded), and
patch_hf(unpad=False) (not for ModernBERT, which runs unpadded only) -- and lists every test that passes unpatched but fails patched. A conftest
patches each model at the end of its outermost __init__, so every way the tests build a model
(Model(config), from_pretrained, Auto*, deepcopy) gives a patched one.

    # a transformers source tree: e.g. from the fetched mirror (no work tree there)
    git --git-dir=/work/.mirror/zucchini-nlp+transformers/repo archive HEAD tests utils \\
        | tar -x -C /tmp/transformers-src
    python scripts/hf_suite.py /tmp/transformers-src                    # all six families
    python scripts/hf_suite.py /tmp/transformers-src --family bert -k attention
    python scripts/hf_suite.py SRC --common ../shared/peer/transformers-bert/tests

--common overlays the top-level common test files (test_modeling_common.py, the mixins) with
copies matching the installed transformers, where the tree is of another version. It needs the
network for nothing: tests that fetch from the Hub fail in every mode and are not counted.
Exit status 1 when any test regresses.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

FAMILIES = {  # family -> transformers modeling module
    "bert": "transformers.models.bert.modeling_bert",
    "roberta": "transformers.models.roberta.modeling_roberta",
    "xlm_roberta": "transformers.models.xlm_roberta.modeling_xlm_roberta",
    "electra": "transformers.models.electra.modeling_electra",
    "distilbert": "transformers.models.distilbert.modeling_distilbert",
    "modernbert": "transformers.models.modernbert.modeling_modernbert",
}
MODES = ("none", "unpad", "pad")
FAMILY_MODES = {"modernbert": ("none", "unpad")}  # patch_hf refuses unpad=False for ModernBERT

CONFTEST = '''\
# fastbert's patch hook (scripts/hf_suite.py): FASTBERT_PATCH=none|unpad|pad
import functools
import importlib
import os

MODE = os.environ.get("FASTBERT_PATCH", "none")
PATCHED = {"models": 0}
if MODE != "none":
    import fastbert
    import torch.nn as nn

    def _wrap(cls):
        original = cls.__dict__["__init__"]

        @functools.wraps(original)
        def __init__(self, *args, **kwargs):
            original(self, *args, **kwargs)
            if type(self) is cls:  # the outermost constructor: the model is fully built
                fastbert.patch_hf(self, unpad=MODE == "unpad")
                PATCHED["models"] += 1
        cls.__init__ = __init__

    for module_name in os.environ["FASTBERT_MODULES"].split(","):
        module = importlib.import_module(module_name)
        base = next(v for k, v in vars(module).items() if k.endswith("PreTrainedModel")
                    and isinstance(v, type) and issubclass(v, nn.Module))
        for obj in list(vars(module).values()):
            if (isinstance(obj, type) and issubclass(obj, base) and obj is not base
                    and "__init__" in obj.__dict__):
                _wrap(obj)


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(f"fastbert: mode {MODE}, {PATCHED['models']} models patched")
'''


def _copy_tree(src: str, dst: str, common: str | None) -> None:
    """The test files the model tests import: tests/*.py, tests/{generation,utils,models/<f>}."""
    tests = os.path.join(src, "tests")
    os.makedirs(os.path.join(dst, "tests", "models"))
    for name in os.listdir(tests):
        path = os.path.join(tests, name)
        if os.path.isfile(path) and name.endswith(".py") and name != "conftest.py":
            shutil.copy(path, os.path.join(dst, "tests", name))
    for sub in ("generation", "utils", "exporters", "pipelines"):
        if os.path.isdir(os.path.join(tests, sub)):
            shutil.copytree(os.path.join(tests, sub), os.path.join(dst, "tests", sub))
    for family in FAMILIES:
        shutil.copytree(os.path.join(tests, "models", family),
                        os.path.join(dst, "tests", "models", family))
    open(os.path.join(dst, "tests", "models", "__init__.py"), "a").close()
    if os.path.isdir(os.path.join(src, "utils")):
        shutil.copytree(os.path.join(src, "utils"), os.path.join(dst, "utils"))
    # some tests read transformers' source files at src/transformers: the installed package
    import transformers
    os.makedirs(os.path.join(dst, "src"))
    os.symlink(os.path.dirname(transformers.__file__), os.path.join(dst, "src", "transformers"))
    if common:
        for name in os.listdir(common):
            if name.endswith(".py") and name not in ("conftest.py", "__init__.py"):
                shutil.copy(os.path.join(common, name), os.path.join(dst, "tests", name))
    with open(os.path.join(dst, "tests", "conftest.py"), "w") as f:
        f.write(CONFTEST)
    with open(os.path.join(dst, "pytest.ini"), "w") as f:
        f.write("[pytest]\naddopts = -p no:cacheprovider\n")


def _outcomes(xml: str) -> dict:
    result = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        name = case.get("classname", "") + "::" + case.get("name", "")
        failed = case.find("failure") is not None or case.find("error") is not None
        result[name] = "fail" if failed else "skip" if case.find("skipped") is not None else "pass"
    return result


def run(src: str, families: list, keyword: str | None, common: str | None) -> int:
    work = tempfile.mkdtemp(prefix="fastbert-hf-suite-")
    _copy_tree(src, work, common)
    env = dict(os.environ, FASTBERT_MODULES=",".join(FAMILIES[f] for f in families),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONHASHSEED="0", HF_HOME=os.path.join(work, "hf_home"))
    env.pop("PYTHONPATH", None)  # the installed fastbert and transformers
    regressions = 0
    for family in families:
        test_file = f"tests/models/{family}/test_modeling_{family}.py"
        outcomes = {}
        for mode in FAMILY_MODES.get(family, MODES):
            xml = os.path.join(work, f"{family}-{mode}.xml")
            command = [sys.executable, "-m", "pytest", test_file, "-q", "-W", "ignore",
                       "--tb=no", f"--junitxml={xml}"] + (["-k", keyword] if keyword else [])
            done = subprocess.run(command, cwd=work, env=dict(env, FASTBERT_PATCH=mode),
                                  capture_output=True, text=True)
            outcomes[mode] = _outcomes(xml) if os.path.exists(xml) else {}
            if mode == "none" and "pass" not in outcomes[mode].values():
                if outcomes[mode] and set(outcomes[mode].values()) == {"skip"}:
                    # e.g. XLM-R's file holds only slow integration tests (its code is RoBERTa's)
                    print(f"{family:12s} nothing runs here: all {len(outcomes[mode])} tests "
                          f"skip unpatched", flush=True)
                else:
                    print(f"{family}: no test passes unpatched; pytest said:\n"
                          f"{(done.stdout + done.stderr)[-3000:]}", flush=True)
                    regressions += 1
                break
        else:
            regressions += _report(family, outcomes)
    shutil.rmtree(work, ignore_errors=True)
    print(f"transformers' model tests on patched models: {regressions} regressions")
    return 1 if regressions else 0


def _report(family: str, outcomes: dict) -> int:
    """Prints, per patched mode, the tests that pass unpatched and not patched; their count."""
    regressions = 0
    passing = sorted(n for n, o in outcomes["none"].items() if o == "pass")
    for mode in [m for m in outcomes if m != "none"]:
        broken = [n.split("::")[-1] for n in passing if outcomes[mode].get(n) != "pass"]
        regressions += len(broken)
        print(f"{family:12s} {mode:6s} {len(passing) - len(broken):4d} of {len(passing)} "
              f"passing unpatched pass patched" + (": broken " + ", ".join(broken)
                                                   if broken else ""), flush=True)
    return regressions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("transformers_src", help="a transformers source tree (tests/, utils/)")
    parser.add_argument("--family", action="append", choices=list(FAMILIES),
                        help="a family to run (repeatable; default all six)")
    parser.add_argument("-k", dest="keyword", help="pytest -k expression")
    parser.add_argument("--common", help="folder of common test files matching the installed "
                                         "transformers, copied over the tree's")
    args = parser.parse_args()
    sys.exit(run(args.transformers_src, args.family or list(FAMILIES), args.keyword,
                 args.common))


if __name__ == "__main__":
    main()
