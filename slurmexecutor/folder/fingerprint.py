"""What identifies a function's code for the result cache: `function_fingerprint(fn)`.

cloudpickle pickles a function of an importable module BY REFERENCE (module + name), so
its bytes stay the same when its body changes. The fingerprint is instead the SHA-256 of
a canonical, tagged, length-prefixed walk of the function (no `id()`, no `hash()`: the
same source gives the same fingerprint in every process):

Covered (a change is a miss):
- a format version and the Python version (major.minor: bytecode differs between them);
- *user functions* (def, lambda, nested, generators): module, qualified name, the code
  object, defaults, keyword-only defaults, the values in its closure cells, and the
  module globals its code names (`co_names` of it and of its nested code objects);
- *code objects*: `co_code`, `co_consts` (recursively: nested functions, lambdas and
  comprehensions; docstrings; frozensets in a canonical order), `co_names`,
  `co_varnames`, `co_freevars`, `co_cellvars`, argument counts, `co_flags` and the
  exception table. Not line numbers nor the file name: moving a function, adding blank
  lines or comments around it keeps its fingerprint;
- referenced globals, walked the same way: user functions and classes recursively (with a
  cycle guard: recursion and mutual recursion are fine); a user module (`import utils`)
  by its name plus those of its attributes the code names (`utils.helper` is walked);
  values by their content (ints, strings, containers, and any object by its pickle
  reduction, `__reduce_ex__(4)`: class, arguments, state; numpy arrays by their bytes);
- *user classes* (of a method's instance, of a callable object, referenced as globals):
  module, qualified name, bases, metaclass and the class dict (methods, static and class
  methods, properties, class attributes);
- bound methods: the function and the instance's content; `functools.partial` and
  callable objects: their reduction (function, arguments, state); decorated functions:
  the wrapper, whose closure or `__wrapped__` (`functools.lru_cache`) holds the function;
- lists, tuples and dicts of 64 or more plain items (numbers, strings, bytes) are
  hashed as their pickle (fast; two equal ones that share string objects differently
  may differ: a miss);
- builtins (`abs`, `math.sqrt`) and *library* functions and classes: module, qualified
  name and the library's `__version__` (and a builtin method's `__self__`).

User code or library: a module is a library when its file lies under the interpreter's
standard library or a site-packages/dist-packages folder, or it has no file (builtins);
anything else (`__main__`, notebooks, your scripts and packages, editable installs) is
user code and walked.

Not covered (a change there is a HIT that returns the old result):
- the code of libraries (only their `__version__`: an upgrade that keeps the version
  string, or a library called indirectly, is not seen), and C extensions' code;
- what a call reads at run time: files, environment variables, the clock, randomness,
  databases; names looked up dynamically (`getattr(module, name)`, `eval`, `importlib`);
- global values that cannot be reduced (locks, open files, generators, sockets): by their
  type only; function attributes (`fn.__dict__`);
- global state mutated after the fingerprint was taken (take it at submission).

Cost: the walk is linear in the code and data reached (about 15 us for a small
function, 0.1 s for a global 1,000,000-item list or 80 MB array): take it once per map,
not per call. A value nested too deeply to walk, or changed by another thread during the
walk, raises `UncacheableError`: run the call without the cache.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import site
import struct
import sys
import sysconfig
import types
from collections.abc import Iterable
from typing import Any

FORMAT = b"slurmexecutor-fingerprint-1"


class UncacheableError(ValueError):
    """The function (or a value it refers to) cannot be fingerprinted: do not cache."""


def function_fingerprint(fn: Any) -> str:
    """A SHA-256 hex digest identifying `fn`'s code (see the module's docstring)."""
    encoder = _Encoder()
    encoder.atom(b"V", FORMAT + b" py%d.%d" % sys.version_info[:2])
    try:
        encoder.value(fn)
    except RuntimeError as error:  # RecursionError; a dict changed during the walk
        raise UncacheableError(f"{fn!r} cannot be fingerprinted: {error}") from error
    return encoder.hexdigest()


# -- user code or library ----------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _library_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    dirs = {paths[name] for name in ("stdlib", "platstdlib", "purelib", "platlib")
            if name in paths}
    dirs.update(site.getsitepackages() if hasattr(site, "getsitepackages") else ())
    dirs.add(site.getusersitepackages())
    dirs.update(entry for entry in sys.path
                if entry.endswith(("site-packages", "dist-packages")))
    return tuple(sorted({os.path.join(os.path.realpath(d), "") for d in dirs if d}))


@functools.lru_cache(maxsize=4096)
def _file_is_library(file: str) -> bool:
    return os.path.realpath(file).startswith(_library_dirs())


def _is_library(module_name: str | None) -> bool:
    """True for the standard library, installed packages and builtins."""
    if not module_name or module_name == "__main__":
        return False
    module = sys.modules.get(module_name)
    if module is None:
        return False  # unknown (not imported): walk it
    file = getattr(module, "__file__", None)
    return True if not file else _file_is_library(file)


def _version(module_name: str) -> str:
    top = sys.modules.get(module_name.partition(".")[0])
    version = getattr(top, "__version__", "")
    return version if isinstance(version, str) else ""


def _global_names(code: types.CodeType) -> list[str]:
    """The names a code object and its nested code objects look up, first seen first."""
    names: dict[str, None] = dict.fromkeys(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names.update(dict.fromkeys(_global_names(const)))
    return list(names)


# -- the canonical walk --------------------------------------------------------------------

_MISSING = object()
_SKIP_CLASS_ATTRIBUTES = frozenset(  # __firstlineno__: the class's line (Python 3.13+)
    {"__dict__", "__weakref__", "__module__", "__qualname__", "__doc__", "__firstlineno__"})
_BUILTIN_TYPES = (types.BuiltinFunctionType, types.MethodWrapperType,
                  types.WrapperDescriptorType, types.MethodDescriptorType,
                  types.ClassMethodDescriptorType)
_SLOT_TYPES = (types.MemberDescriptorType, types.GetSetDescriptorType)
_IMMUTABLE = (tuple, frozenset, types.CodeType)
_ATOMS = frozenset({type(None), bool, int, float, complex, str, bytes})
_BULK = 64  # a list, tuple or dict this long of atoms only is hashed as its pickle


class _Encoder:
    """Feeds a prefix-free encoding of values to one SHA-256. Objects met again are
    encoded as a back reference to their first visit (in visit order: deterministic);
    the objects are kept alive during the walk so their ids are not reused."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._memo: dict[int, int] = {}
        self._keep: list[Any] = []
        self._modules: list[int] = []  # user modules being walked (a cycle guard)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    def atom(self, tag: bytes, data: bytes = b"") -> None:
        self._hash.update(tag + struct.pack(">Q", len(data)) + data)

    def text(self, tag: bytes, *parts: str) -> None:
        """Strings, each length-prefixed (so no two lists of them encode the same)."""
        encoded = [part.encode("utf-8", "surrogatepass") for part in parts]
        self.atom(tag, b"".join(struct.pack(">Q", len(data)) + data for data in encoded))

    def count(self, tag: bytes, number: int) -> None:
        self.atom(tag, struct.pack(">Q", number))

    def value(self, obj: Any) -> None:
        kind = type(obj)
        if obj is None or obj is Ellipsis or obj is NotImplemented:
            self.text(b"N", repr(obj))
        elif kind is bool:
            self.atom(b"?", b"1" if obj else b"0")
        elif kind is int:
            self.atom(b"i", obj.to_bytes(obj.bit_length() // 8 + 1, "big", signed=True))
        elif kind is float:
            self.atom(b"f", struct.pack(">d", obj))
        elif kind is complex:
            self.atom(b"j", struct.pack(">dd", obj.real, obj.imag))
        elif kind is str:
            self.text(b"s", obj)
        elif kind is bytes:
            self.atom(b"b", obj)
        elif kind in _IMMUTABLE:  # no back references: sharing is the compiler's choice
            self._object(obj, kind)
        elif id(obj) in self._memo:
            self.count(b"R", self._memo[id(obj)])
        else:
            self._memo[id(obj)] = len(self._memo)
            self._keep.append(obj)
            self._object(obj, kind)

    def _object(self, obj: Any, kind: type) -> None:
        if kind is bytearray:
            self.atom(b"B", bytes(obj))
        elif kind in (list, tuple, dict) and len(obj) >= _BULK and _plain(obj, kind):
            self.atom(b"A" + kind.__name__[:1].encode(), pickle.dumps(obj, 4))
        elif kind in (tuple, list):
            self.count(b"T" if kind is tuple else b"L", len(obj))
            for item in obj:
                self.value(item)
        elif kind is dict:  # insertion order kept: it can matter to the code
            self.count(b"D", len(obj))
            for item_key, item in obj.items():
                self.value(item_key)
                self.value(item)
        elif kind in (set, frozenset):  # canonical order: by each item's own digest
            digests = sorted(_digest_of(item) for item in obj)
            self.count(b"S" if kind is set else b"Z", len(digests))
            for digest in digests:
                self.atom(b"h", digest)
        elif kind is types.CodeType:
            self._code(obj)
        elif kind is types.FunctionType:
            self._function(obj)
        elif kind is types.MethodType:
            self.atom(b"M")
            self.value(obj.__func__)
            self.value(obj.__self__)
        elif kind is types.ModuleType:
            self._module(obj, ())
        elif isinstance(obj, type):
            self._class(obj)
        elif kind in _BUILTIN_TYPES:
            self._builtin(obj)
        elif kind in (staticmethod, classmethod):
            self.text(b"W", kind.__name__)
            self.value(obj.__func__)
        elif kind is property:
            self.atom(b"p")
            for accessor in (obj.fget, obj.fset, obj.fdel):
                self.value(accessor)
        else:
            self._reduced(obj, kind)

    def _code(self, code: types.CodeType) -> None:
        self.atom(b"C", code.co_code)
        self.value(code.co_consts)
        for names in (code.co_names, code.co_varnames, code.co_freevars, code.co_cellvars):
            self.text(b"n", *names)
        self.value((code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount,
                    code.co_flags))
        self.atom(b"x", getattr(code, "co_exceptiontable", b""))

    def _function(self, fn: types.FunctionType) -> None:
        module = fn.__module__
        if _is_library(module):
            self.text(b"l", module or "", fn.__qualname__, _version(module or ""))
            return
        self.text(b"F", module or "", fn.__qualname__)
        self._code(fn.__code__)
        self.value(fn.__defaults__)
        self.value(fn.__kwdefaults__)
        cells = fn.__closure__ or ()
        self.count(b"c", len(cells))
        for cell in cells:
            try:
                contents = cell.cell_contents
            except ValueError:  # an empty cell
                self.atom(b"e")
            else:
                self.value(contents)
        names = _global_names(fn.__code__)
        namespace = fn.__globals__
        for name in names:
            value = namespace.get(name, _MISSING)
            if value is not _MISSING:
                self.text(b"g", name)
                self._global(value, names)

    def _global(self, value: Any, names: list[str]) -> None:
        if type(value) is types.ModuleType:
            self._module(value, names)
        else:
            self.value(value)

    def _module(self, module: types.ModuleType, names: Iterable[str]) -> None:
        """A module by name; a user module also by the attributes the code names (not
        memoised: each referrer names its own attributes)."""
        name = module.__name__
        if _is_library(name):
            self.text(b"m", name, _version(name))
            return
        self.text(b"U", name)
        if id(module) in self._modules:
            return
        self._modules.append(id(module))
        namespace = vars(module)
        for attribute in names:
            value = namespace.get(attribute, _MISSING)
            if value is not _MISSING:
                self.text(b"a", attribute)
                self._global(value, list(names))
        self._modules.pop()

    def _class(self, cls: type) -> None:
        module = getattr(cls, "__module__", None)
        qualname = getattr(cls, "__qualname__", cls.__name__)
        if _is_library(module):
            self.text(b"k", str(module), qualname, _version(str(module)))
            return
        self.text(b"K", str(module), qualname)
        self.value(cls.__bases__)
        self.value(type(cls))
        items = [(name, value) for name, value in vars(cls).items()
                 if name not in _SKIP_CLASS_ATTRIBUTES and type(value) not in _SLOT_TYPES]
        self.count(b"d", len(items))
        for name, value in items:
            self.value(name)
            self.value(value)

    def _builtin(self, obj: Any) -> None:
        owner = getattr(obj, "__objclass__", None)
        module = getattr(obj, "__module__", None) or getattr(owner, "__module__", "")
        self.text(b"y", type(obj).__name__, str(module),
                  getattr(obj, "__qualname__", getattr(obj, "__name__", "")),
                  _version(str(module)))
        bound = getattr(obj, "__self__", None)
        if bound is not None and type(bound) is not types.ModuleType:
            self.value(bound)

    def _reduced(self, obj: Any, kind: type) -> None:
        """Any other object: by its pickle reduction (class, arguments, state, items)."""
        try:
            reduced = obj.__reduce_ex__(4)
        except Exception:  # noqa: BLE001  (unpicklable: locks, files, generators)
            self.text(b"?", kind.__module__, kind.__qualname__)
            return
        if isinstance(reduced, str):  # a global reached by name (lru_cache wrappers)
            self.text(b"G", kind.__module__, kind.__qualname__, reduced)
            self.value(getattr(obj, "__wrapped__", None))
            return
        parts = list(reduced)
        for position in (3, 4):  # list and dict items come as iterators
            if position < len(parts) and parts[position] is not None:
                parts[position] = list(parts[position])
        self.count(b"r", len(parts))
        for part in parts:
            self.value(part)


def _plain(obj: Any, kind: type) -> bool:
    """Only atoms in it (a dict: as keys and values): its pickle is as canonical as our
    walk (and made in C)."""
    if kind is dict:
        return {type(k) for k in obj} <= _ATOMS and {type(v) for v in obj.values()} <= _ATOMS
    return {type(item) for item in obj} <= _ATOMS


def _digest_of(item: Any) -> bytes:
    encoder = _Encoder()
    encoder.value(item)
    return encoder._hash.digest()
