"""The marked commands of the pages that use no other page's outputs (tests/test_docs.py's
OWN_SCRATCH: docs/pipeline.md, docs/own-data.md), run as tests/test_docs.py runs every page's, each
page in a scratch folder of its own, so they run beside the other pages."""

import pytest

from tests.test_docs import OWN_SCRATCH, PAGES, RAY_CHATTER, make_scratch, run_marked_blocks

OWN = [p for p in PAGES if p.name in OWN_SCRATCH]


@pytest.fixture
def scratch(tmp_path_factory, s3_server):
    return make_scratch(tmp_path_factory)


@pytest.mark.slow
@pytest.mark.parametrize("page", OWN, ids=[p.name for p in OWN])
def test_marked_commands_run(page, scratch):
    outputs = run_marked_blocks(page, *scratch)
    if page.name == "own-data.md":  # jobs on HF folders load weights in every process: no bar in a log
        chatter = [line for out in outputs[1:]  # the first block is the reader's own Python (its save_pretrained)
                   for line in out.splitlines() if any(m in line for m in RAY_CHATTER)]
        assert chatter == [], "\n".join(chatter[:20])
