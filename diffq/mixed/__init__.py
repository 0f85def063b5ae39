"""Mixed precision: measure each unit's sensitivity per candidate format (:mod:`.measure`) into a
:class:`~.table.SensitivityTable` (:mod:`.table`; units from :mod:`.units`), choose formats under a
size or BitOPs budget by integer programming (:mod:`.allocate`) into a :class:`~.plan.BitPlan`
(:mod:`.plan`), and plot both (:mod:`.plots`). Import the submodules; this file imports nothing."""
