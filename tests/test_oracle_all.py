"""Every net case of ../shared/oracle (computed by the authors' Caffe) through the Net executor.

Runs on the current device: CRFGRAD_TEST_DEVICE=gpu makes it check CuPy (tools/gpu_check.py)."""
import os

import pytest

import oracle_util as ou

NET_CASES = [c['name'] for c in (ou.cases() if os.path.isdir(ou.ORACLE) else [])
             if 'npz' in c['files'] and not c['name'].startswith('solver')]


@pytest.mark.parametrize('name', NET_CASES)
def test_oracle_case(name, shared_dir):
    # reproduce_caffe_quirks: the CrfGrad cases store Caffe's own (partly wrong) numbers
    errors = ou.check_case(name, quirks=True)
    assert errors, 'nothing compared for %s' % name


@pytest.mark.parametrize('kind', ['caffemodel', 'caffemodel_h5'])
def test_whole_net_from_weight_files(kind, shared_dir):
    c = ou.case('whole_net')
    ou.check_case('whole_net', quirks=True, weights=ou.path(c['files'][kind]))


def test_every_net_case_is_covered(shared_dir):
    layer_cases = [c for c in ou.cases() if 'npz' in c['files'] and 'trajectory' not in c['files']['npz']]
    assert len(layer_cases) == len(NET_CASES) >= 60
