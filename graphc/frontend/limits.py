"""What a .nn file may hold, beyond the grammar: the limits docs/language.md states. Sizes of
tensors are the type system's (graphc.ir.types: MAX_DIM, MAX_ELEMENTS)."""

# Expressions nest at most this deep (calls, operators, lists, unary minus; a call of a user
# function evaluates its body one level further down). The parser, the builder and the checks
# of train blocks recurse once per level: the bound keeps them far from Python's own limit.
MAX_NESTING = 200

# The parser's stack grows with every open bracket and pending operator (parentheses included,
# which the tree does not keep): a few entries per level of nesting.
MAX_PARSE_STACK = 4 * MAX_NESTING + 64

# A model evaluates at most this many expressions, the bodies of user functions counted at each
# call: functions that call another twice double with every level (f2(x) = f1(f1(x))), and
# thirty levels would take days.
MAX_EVALUATIONS = 20_000

# Integers are int64 on every backend; larger ones are written as floats (1e30).
MAX_INT = 2**63 - 1

# Parameters are held four times over while training (values, gradients, two optimizer
# moments): 16 GiB of them fills an 80 GB accelerator.
MAX_PARAM_BYTES = 16 * 2**30
