"""Raw dataset copies -> rows: one reader per family (nih, tb, chexpert, padchest, mimic, tbx11k, vindr,
csv_dataset; labelled.py is the label-table datasets' shared record; nih_expert.py reads NIH's expert labels), every
problem collected."""
