"""The ground floor: where files live and how they are read and written. Local paths and URIs
(paths), bounded reads of regular files (reading), whole-or-nothing writes (atomic), temp folders of
killed runs (leftovers), the safe YAML reader (safe_yaml). Everything in raytrain may import it; it
imports nothing of raytrain but its errors.
"""
