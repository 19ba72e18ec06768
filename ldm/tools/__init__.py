"""Tools that measure the product: benchmark, quality bench, MONAI comparison, fault check. Nothing
else imports them."""
