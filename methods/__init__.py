"""Built-in method plugins. Importing this package registers them.

Each module is one method family; it reads top to bottom: config dataclass,
heads/gates, the ExitPolicy subclass, registration. The harness finds this
package through the ``harness.methods`` entry point in pyproject.toml, the
same way it finds methods from other packages.
"""

from methods import cls_ee, confidence, evit, lra_ee, pabee, token_pruner  # noqa: F401
