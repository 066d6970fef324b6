"""Rewrites a CUDA source (.cu) into C++ for the emulated device (csrc/cuda_emulator/README.md).

    python rewrite.py IN.cu OUT.cpp

Only three constructs change; everything else is copied, and the line numbers stay the
original's (a #line directive, and every rewritten span keeps its newlines), so compiler
messages, __LINE__ in the emulator's barrier checks and AddressSanitizer reports point at IN.cu:

  kernel<<<grid, block[, shared[, stream]]>>>(args);
      -> ::palmcore_emu::launch(grid, block, shared, stream, "kernel", address,
                                [](auto&&... a) { kernel(a...); }, args);
     The generic lambda lets template arguments be deduced from the arguments as nvcc deduces
     them; `kernel<T, 4><<<...>>>` keeps its explicit arguments. `address` is the kernel
     function's address (cudaFuncSetAttribute's key), or nullptr for a template kernel whose
     arguments are deduced at the launch (no attribute can have been set for it).
  __shared__ T name[N]...;      -> auto& name = ::palmcore_emu::shared_static<T[N]...>(id);
  extern __shared__ T name[];   -> T* const name = ::palmcore_emu::shared_dynamic<T>();
"""

from __future__ import annotations

import re
import sys

IDENT = re.compile(r"[A-Za-z_]\w*")


def matching(text: str, start: int, open_: str, close: str) -> int:
    """Index just past the bracket closing the one at text[start] (parentheses, brackets and
    braces nest; angle brackets are matched only for open_ == '<')."""
    depth = 0
    pairs = {"(": ")", "[": "]", "{": "}"}
    stack: list[str] = []
    i = start
    while i < len(text):
        c = text[i]
        if c == open_ and (open_ != "<" or not stack):
            depth += 1
        elif c == close and (open_ != "<" or not stack):
            depth -= 1
            if depth == 0:
                return i + 1
        elif c in pairs:
            stack.append(pairs[c])
        elif stack and c == stack[-1]:
            stack.pop()
        i += 1
    raise SyntaxError(f"unbalanced {open_!r} at offset {start}")


def split_top_level(text: str) -> list[str]:
    """Comma-separated parts of text, commas inside (), [] or {} not counting."""
    parts, depth, current = [], 0, []
    for c in text:
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if c == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(c)
    parts.append("".join(current))
    return [p.strip() for p in parts]


def template_kernels(text: str) -> set[str]:
    """Names of the kernels declared as templates in this file."""
    pattern = re.compile(r"template\s*<[^;{]*?>\s*__global__\s+(?:void\s+)?(?:__launch_bounds__\s*\([^)]*\)\s*)?"
                         r"(?:void\s+)?(\w+)\s*\(")
    return set(pattern.findall(text))


def kernel_start(text: str, end: int) -> int:
    """Start of the kernel expression (a name, maybe with template arguments) ending at end."""
    i = end
    while i > 0 and text[i - 1].isspace():
        i -= 1
    if text[i - 1] == ">":  # explicit template arguments: walk back to their '<'
        depth = 0
        while True:
            i -= 1
            if text[i] == ">":
                depth += 1
            elif text[i] == "<":
                depth -= 1
                if depth == 0:
                    break
        while i > 0 and text[i - 1].isspace():
            i -= 1
    j = i
    while j > 0 and (text[j - 1].isalnum() or text[j - 1] in "_:"):
        j -= 1
    if j == i:
        raise SyntaxError(f"no kernel name before '<<<' at offset {end}")
    return j


def masked(text: str) -> str:
    """text with its comments and string literals blanked (same length, newlines kept), for
    finding code."""
    pattern = re.compile(r'//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\])*"', re.S)
    return pattern.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)


def rewrite_launches(text: str) -> str:
    templates = template_kernels(masked(text))
    code = masked(text)
    out, pos = [], 0
    while (at := code.find("<<<", pos)) != -1:
        start = kernel_start(text, at)
        kernel = text[start:at].strip()
        name = IDENT.search(kernel.split("<")[0].split("::")[-1]).group(0)
        close = text.find(">>>", at)
        config = split_top_level(text[at + 3:close])
        if not 2 <= len(config) <= 4:
            raise SyntaxError(f"launch of {kernel}: {len(config)} configuration values")
        config += ["0", "nullptr"][len(config) - 2:]
        paren = close + 3
        while text[paren].isspace():
            paren += 1
        if text[paren] != "(":
            raise SyntaxError(f"launch of {kernel}: no argument list")
        args_end = matching(text, paren, "(", ")")
        args = text[paren + 1:args_end - 1]
        deduced = name in templates and "<" not in kernel
        address = "nullptr" if deduced else f"reinterpret_cast<const void*>(&{kernel})"
        call = (f"::palmcore_emu::launch({', '.join(config)}, \"{name}\", {address}, "
                f"[](auto&&... a) {{ {kernel}(a...); }}{', ' if args.strip() else ''}{args})")
        original = text[start:args_end]
        out.append(text[pos:start])
        out.append(call + "\n" * (original.count("\n") - call.count("\n")))
        pos = args_end
    out.append(text[pos:])
    return "".join(out)


STATIC_SHARED = re.compile(r"(?<!extern )__shared__\s+(?:__align__\s*\(\s*\d+\s*\)\s*)?([^;]*?)\s*\b(\w+)\s*((?:\[[^\]]*\]\s*)*);")
DYNAMIC_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\s*\(\s*\d+\s*\)\s*)?([^;]*?)\s*\b(\w+)\s*\[\s*\]\s*;")


def substitute(pattern: re.Pattern, text: str, replacement) -> str:
    """pattern.sub over the code of text (not its comments or strings)."""
    out, pos = [], 0
    for m in pattern.finditer(masked(text)):
        out += [text[pos:m.start()], replacement(m)]
        pos = m.end()
    return "".join(out) + text[pos:]


def rewrite_shared(text: str) -> str:
    text = substitute(DYNAMIC_SHARED, text, lambda m: f"{m.group(1)}* const {m.group(2)} = "
                                                      f"::palmcore_emu::shared_dynamic<{m.group(1)}>();")
    counter = iter(range(1, 1 << 30))

    def static(m: re.Match) -> str:
        dims = "".join(m.group(3).split())
        return f"auto& {m.group(2)} = ::palmcore_emu::shared_static<{m.group(1)}{dims}>({next(counter)});"

    return substitute(STATIC_SHARED, text, static)


def rewrite(text: str, path: str) -> str:
    body = rewrite_launches(rewrite_shared(text))
    code = masked(body)
    if "__shared__" in code or "<<<" in code:
        raise SyntaxError(f"{path}: a __shared__ or <<< the rewrite did not handle")
    return f'#line 1 "{path}"\n' + body


def main() -> None:
    source, target = sys.argv[1], sys.argv[2]
    with open(source, encoding="utf-8") as f:
        text = f.read()
    result = rewrite(text, source)
    with open(target, "w", encoding="utf-8") as f:
        f.write(result)


if __name__ == "__main__":
    main()
