"""placeholder"""

from cmi_sdk import hookimpl, StandardRegistry


@hookimpl
def cmi_register_standards(register: StandardRegistry) -> None:
    pass
