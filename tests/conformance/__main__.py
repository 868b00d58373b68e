"""``python -m tests.conformance``: print the README's support table."""

from tests.conformance.expected import render_table

print(render_table())
