"The docs site's signatures: `show_doc` shows each parameter's docment (the comment on its line) beside it, so a comment the formatter moved off its parameter's line is a docment lost."

import ast
import importlib
import inspect
import io
import pkgutil
import textwrap
import tokenize

import pytest
from fastcore.docments import docments

import aksis


def documented() -> dict[str, object]:
    "Every function and class the modules export (their `__all__`, which the docs pages show), and the public methods of those classes"
    found = {}
    for module in pkgutil.iter_modules(aksis.__path__):
        if module.name.startswith("_"):
            continue
        mod = importlib.import_module(f"aksis.{module.name}")
        for name in mod.__all__:
            obj = getattr(mod, name)
            if inspect.isfunction(obj) or inspect.isclass(obj):
                found[f"{module.name}.{name}"] = obj
            if inspect.isclass(obj) and obj.__module__ == mod.__name__:
                for attr in vars(obj):
                    function = getattr(obj, attr)
                    function = getattr(function, "__func__", function)  # a classmethod's
                    if inspect.isfunction(function) and not attr.startswith("_"):
                        found[f"{module.name}.{name}.{attr}"] = function
    return found


def return_line_comment(obj) -> str | None:
    "The comment on the line of `obj`'s return annotation, if it has both"
    function = obj.__init__ if inspect.isclass(obj) else obj
    try:
        source = textwrap.dedent(inspect.getsource(function))  # a method's too
    except (OSError, TypeError):
        return None
    definition = ast.parse(source).body[0]
    if not isinstance(definition, ast.FunctionDef) or definition.returns is None:
        return None
    comments = {
        t.start[0]: t.string
        for t in tokenize.generate_tokens(io.StringIO(source).readline)
        if t.type == tokenize.COMMENT
    }
    return comments.get(definition.returns.end_lineno)


@pytest.mark.parametrize("name, obj", documented().items(), ids=list(documented()))
def test_every_parameter_shows_its_docment(name, obj):
    "Where a signature has docments, every parameter has its own (`**kwargs` cannot: `show_doc` leaves them out), and none sits on the return line"
    try:
        params = docments(obj, full=True)
    except (TypeError, ValueError):  # a builtin's signature: nothing of ours to show
        return
    returned = params.pop("return", None)
    params.pop("self", None), params.pop("cls", None)
    named = {k: v for k, v in params.items() if v.kind != inspect.Parameter.VAR_KEYWORD}
    if any(v.docment for v in named.values()):
        missing = [k for k, v in named.items() if not v.docment]
        assert not missing, f"{name}: no docment for {missing}"
    if returned is not None and returned.docment:
        assert return_line_comment(obj), (
            f"{name}: the return line shows {returned.docment!r}, a comment from a line above it"
        )
