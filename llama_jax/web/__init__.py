"""The web chat page that `python -m eval.serve` serves at /: index.html, chat.js and chat.css, plain files with no
build step. A package only so that setuptools ships the files (setup.cfg's package_data for llama_jax.web); there is
no Python here. docs/web_chat.md describes the page."""
