"""The editing mathematics of Prompt-to-Prompt and Free-Prompt-Editing as plain torch code.

Nothing here imports ComfyUI: token handling, prompt alignment, step schedules, layer addressing,
the attention edits themselves, and the record of a source branch. `nodes/` wires it into ComfyUI.
"""
