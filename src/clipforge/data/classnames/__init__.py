"""Class-name lists shipped with clipforge, one name per line in label order (``data.classnames: <name>``)."""
