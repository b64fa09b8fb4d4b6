"""Bad input through `crfgrad info`: exit code 2 and one line naming the file, line/layer and field."""

import pytest

import crfgrad_cupy as cc
from crfgrad_cupy.cli import main
from crfgrad_cupy.errors import CrfGradError

GOOD = '''name: "n"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 dim: 5 dim: 5 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 3 kernel_size: 3 } }
'''


def run_cli(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines()


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text) if isinstance(text, str) else p.write_bytes(text)
    return str(p)


def expect_one_line(code, lines, *fragments):
    assert code == 2
    assert len(lines) == 1, lines
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])
    assert 'Traceback' not in lines[0]


def test_syntax_error_names_file_and_line(tmp_path, capsys):
    path = write(tmp_path, 'bad.prototxt', GOOD.replace('num_output: 3', 'num_output: 3 }}'))
    code, lines = run_cli(['info', path], capsys)
    expect_one_line(code, lines, 'bad.prototxt:4')


def test_unknown_layer_type(tmp_path, capsys):
    path = write(tmp_path, 'u.prototxt', GOOD.replace('"Convolution"', '"Convolutionn"'))
    code, lines = run_cli(['info', path], capsys)
    expect_one_line(code, lines, 'u.prototxt', "'conv'", "'type'", 'Convolutionn')


def test_missing_bottom_blob(tmp_path, capsys):
    path = write(tmp_path, 'm.prototxt', GOOD.replace('bottom: "data"', 'bottom: "dat"'))
    code, lines = run_cli(['info', path], capsys)
    expect_one_line(code, lines, 'm.prototxt', "'conv'", "'bottom'", 'dat')


def test_truncated_and_non_protobuf_caffemodel(tmp_path, capsys):
    proto = write(tmp_path, 'n.prototxt', GOOD)
    net = cc.Net(proto, cc.TEST)
    good = str(tmp_path / 'w.caffemodel')
    net.save(good)
    data = open(good, 'rb').read()
    trunc = write(tmp_path, 't.caffemodel', data[:len(data) // 2])
    code, lines = run_cli(['info', proto, trunc], capsys)
    expect_one_line(code, lines, 't.caffemodel')
    png = write(tmp_path, 'p.caffemodel', b'\x89PNG\r\n\x1a\n' + bytes(range(256)) * 4)
    code, lines = run_cli(['info', proto, png], capsys)
    expect_one_line(code, lines, 'p.caffemodel')


def test_weights_shape_mismatch_names_layer_and_shapes(tmp_path, capsys):
    proto = write(tmp_path, 'n.prototxt', GOOD)
    net = cc.Net(proto, cc.TEST)
    good = str(tmp_path / 'w.caffemodel')
    net.save(good)
    other = write(tmp_path, 'o.prototxt', GOOD.replace('num_output: 3', 'num_output: 4'))
    code, lines = run_cli(['info', other, good], capsys)
    expect_one_line(code, lines, 'w.caffemodel', "'conv'", '(3, 2, 3, 3)', '(4, 2, 3, 3)')


def test_unsupported_v1_enum(tmp_path, capsys):
    v1 = '''name: "old"
input: "data" input_dim: 1 input_dim: 1 input_dim: 4 input_dim: 4
layers { name: "pad" type: PADDING bottom: "data" top: "p" }
'''
    path = write(tmp_path, 'v1.prototxt', v1)
    code, lines = run_cli(['info', path], capsys)
    expect_one_line(code, lines, 'v1.prototxt', "'pad'", 'type')


def test_missing_file_and_debug_traceback(tmp_path, capsys):
    code, lines = run_cli(['info', str(tmp_path / 'nope.prototxt')], capsys)
    expect_one_line(code, lines, 'nope.prototxt')
    with pytest.raises(CrfGradError):
        main(['--debug', 'info', str(tmp_path / 'nope.prototxt')])


def test_success_exits_zero(tmp_path, capsys):
    path = write(tmp_path, 'n.prototxt', GOOD)
    code = main(['info', path])
    out = capsys.readouterr().out
    assert code == 0 and 'conv 1x3x3x3' in out and '3x2x3x3' in out
