"""Reports: comparison results rendered as terminal tables, JSON, JUnit XML and Markdown."""
