"""Configuration errors from `python -m dancegrpo_fast.train`: one line on stderr that names the
argument, exit code 2, no traceback, and before any model or reward is loaded."""
import pytest

from dancegrpo_fast import train


@pytest.fixture
def no_loading(monkeypatch):
    """Fail loudly if an error case gets as far as building a trainer (the heavy part)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the configuration error was not caught before loading")

    monkeypatch.setattr(train, "Trainer", refuse)
    monkeypatch.delenv(train.DEBUG_ENV, raising=False)


def run(argv, capsys):
    code = train.main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


CASES = [
    (["--preset", "fluxx"], "unknown preset 'fluxx'"),
    (["--num_iterations", "abc"], "'num_iterations' expects int, got 'abc'"),
    (["--num_iterations", "-1"], "num_iterations"),
    (["--rewards", "nosuch:1.0"], "unknown reward name(s) ['nosuch']"),
    (["--model_path", "/nonexistent/flux"], "model_path '/nonexistent/flux' does not exist"),
    (["--config", "/nonexistent/run.yaml"], "config file '/nonexistent/run.yaml' does not exist"),
    (["--model_family", "nosuch"], "model_family must be one of"),
]


@pytest.mark.parametrize("argv, expected", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_configuration_is_one_line_exit_2(argv, expected, capsys, no_loading):
    code, err = run(argv, capsys)
    assert code == 2
    assert expected in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("error: ")


def test_malformed_yaml_names_the_line(tmp_path, capsys, no_loading):
    config = tmp_path / "run.yaml"
    config.write_text("num_iterations: 3\nlr: [1e-5\nseed: 1\n")
    code, err = run(["--config", str(config)], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "is not valid YAML at line 3" in err, err


def test_debug_variable_shows_the_traceback(monkeypatch, no_loading):
    monkeypatch.setenv(train.DEBUG_ENV, "1")
    with pytest.raises(ValueError, match="unknown preset"):
        train.main(["--preset", "fluxx"])
