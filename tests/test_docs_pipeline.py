"""The marked commands of docs/pipeline.md, run as tests/test_docs.py runs every page's, in a
scratch folder of their own: the page uses no other page's outputs, so it runs beside them."""

import pytest

from tests.test_docs import OWN_SCRATCH, PAGES, make_scratch, run_marked_blocks

OWN = [p for p in PAGES if p.name in OWN_SCRATCH]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory, s3_server):
    return make_scratch(tmp_path_factory)


@pytest.mark.slow
@pytest.mark.parametrize("page", OWN, ids=[p.name for p in OWN])
def test_marked_commands_run(page, scratch):
    run_marked_blocks(page, *scratch)
