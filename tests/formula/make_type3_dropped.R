# lme4/lmerTest reference for tests/formula/test_type3_dropped.py: lmerTest's type III anova
# (its default) of y ~ group * sex + time + (1 | subject) at voxels whose observed rows miss
# a whole cell of group x sex or a whole group, where lme4 drops the dependent columns and
# lmerTest builds the type III hypotheses on what is left ("Missing cells for: ...").
# 36 subjects: groups A, B, C x sex F, M (6 subjects per cell) x visits at time 0, 1, 2;
# y1..y6 are six voxels:
#   y1 complete; y2 no image of cell C:F; y3 no image of group C; y4 no image of cell B:M
#   and 9 other images missing; y5 no image of cells C:F and A:M; y6 no image of group A,
#   the reference level (R's factor then takes B as reference; mpiblmm keeps its X).
# Writes type3_dropped.csv (the data) and type3_dropped_lme4.json (per model and voxel: the
# kept coefficients, logLik, and the F, NumDF, DenDF and p of each term's row of anova(m);
# "sum_..." the same with group and sex coded by contr.sum).
# Each voxel is fitted on its observed rows as a user of lme4 would (group and sex factors:
# lme4 drops an unused level).  Best of bobyqa and Nelder_Mead by logLik.
# Run from the repository root: Rscript tests/formula/make_type3_dropped.R
# (R 4.2.2, lme4 1.1-31, lmerTest 3.1-3, jsonlite 1.8.4)
suppressMessages({library(lme4); library(lmerTest); library(jsonlite)})
set.seed(2611)
d <- expand.grid(time = 0:2, subject = sprintf("s%02d", 1:36))[, c("subject", "time")]
k <- as.integer(factor(d$subject)) - 1
d$group <- c("A", "B", "C")[k %/% 12 + 1]
d$sex <- c("F", "M")[(k %/% 6) %% 2 + 1]
u <- rnorm(36, sd = 1.1)[k + 1]
shift <- c(A = 0, B = 0.7, C = -0.4)[d$group] + ifelse(d$sex == "M", 0.3, 0) +
  ifelse(d$group == "C" & d$sex == "M", 0.5, 0)
for (v in 1:6) d[[paste0("y", v)]] <- round(10 + shift + 0.4 * d$time + u + rnorm(nrow(d)), 6)
d$y2[d$group == "C" & d$sex == "F"] <- NA
d$y3[d$group == "C"] <- NA
d$y4[d$group == "B" & d$sex == "M"] <- NA
d$y4[c(1, 5, 11, 20, 44, 60, 75, 90, 101)] <- NA
d$y5[(d$group == "C" & d$sex == "F") | (d$group == "A" & d$sex == "M")] <- NA
d$y6[d$group == "A"] <- NA
write.csv(d[, c("subject", "time", "group", "sex", paste0("y", 1:6))],
          "tests/formula/type3_dropped.csv", row.names = FALSE, quote = FALSE, na = "")
d$group <- factor(d$group); d$sex <- factor(d$sex)
best <- function(formula, data, reml, contrasts = NULL) {
  fits <- lapply(c("bobyqa", "Nelder_Mead"), function(opt) suppressMessages(
    lmer(formula, data = data, REML = reml, contrasts = contrasts,
         control = lmerControl(optimizer = opt))))
  fits[[which.max(sapply(fits, function(f) as.numeric(logLik(f))))]]
}
out <- list()
for (reml in c(TRUE, FALSE)) for (v in 1:6) {
  data <- d[!is.na(d[[paste0("y", v)]]), ]
  m <- best(as.formula(paste0("y", v, " ~ group * sex + time + (1 | subject)")), data, reml)
  a <- suppressMessages(anova(m))
  r <- list(kept = names(fixef(m)), logLik = as.numeric(logLik(m)), anova = list())
  for (term in rownames(a)) r$anova[[term]] <- list(F = a[term, "F value"],
    df_num = a[term, "NumDF"], df_den = a[term, "DenDF"], p = a[term, "Pr(>F)"])
  out[[paste0(if (reml) "REML" else "ML", "_y", v)]] <- r
  # the same with sum-to-zero coding: lmerTest builds the hypotheses in treatment coding and
  # maps them to these coefficients
  m <- best(as.formula(paste0("y", v, " ~ group * sex + time + (1 | subject)")), data, reml,
            list(group = "contr.sum", sex = "contr.sum"))
  a <- suppressMessages(anova(m))
  r <- list(kept = names(fixef(m)), logLik = as.numeric(logLik(m)), anova = list())
  for (term in rownames(a)) r$anova[[term]] <- list(F = a[term, "F value"],
    df_num = a[term, "NumDF"], df_den = a[term, "DenDF"], p = a[term, "Pr(>F)"])
  out[[paste0("sum_", if (reml) "REML" else "ML", "_y", v)]] <- r
}
writeLines(toJSON(out, digits = NA, auto_unbox = TRUE, pretty = TRUE),
           "tests/formula/type3_dropped_lme4.json")
