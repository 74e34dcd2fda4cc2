# R's sort of the strings of r_sort_data.txt, written back in R's order, for
# tests/formula/test_r_collation.py.  Run from the repository root in R's usual locale
# (Linux/macOS, ICU collation: capabilities("ICU") TRUE):
#     Rscript tests/formula/make_r_sort.R
path <- "tests/formula/r_sort_data.txt"
x <- readLines(path, encoding = "UTF-8")
stopifnot(capabilities("ICU"))
writeLines(sort(x), path, useBytes = TRUE)
